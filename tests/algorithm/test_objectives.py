"""BCO, delta, adaptive beta, GRPO advantages and pass@k against hand-derived values."""

import math

import pytest
import torch

from vpd_lightning.algorithm.objectives import (
    adapt_beta,
    bco_loss_terms,
    bias_corrected,
    ema_update,
    group_advantages,
    grpo_token_loss,
    implicit_reward,
)
from vpd_lightning.trainer.metrics import MeanAtN, PassAtK, unbiased_pass_at_k


def test_implicit_reward_detaches_the_student():
    teacher = torch.tensor([-3.0, -1.0], requires_grad=True)
    student = torch.tensor([-2.0, -2.0], requires_grad=True)
    r = implicit_reward(teacher, student, beta=0.1)
    torch.testing.assert_close(r, torch.tensor([-0.1, 0.1]))
    r.sum().backward()
    assert student.grad is None
    torch.testing.assert_close(teacher.grad, torch.tensor([0.1, 0.1]))


def test_bco_terms_match_the_formula_and_weights_drop_sequences():
    rewards = torch.tensor([0.5, -0.2, 0.3, 1.0])
    success = torch.tensor([True, False, True, False])
    delta = 0.1
    s, f = bco_loss_terms(rewards, success, delta)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected_s = -math.log(sig(0.4)) - math.log(sig(0.2))
    expected_f = -math.log(sig(0.3)) - math.log(sig(-0.9))
    assert s.item() == pytest.approx(expected_s, rel=1e-6)
    assert f.item() == pytest.approx(expected_f, rel=1e-6)
    s_w, f_w = bco_loss_terms(rewards, success, delta, torch.tensor([1.0, 0.0, 0.0, 1.0]))
    assert s_w.item() == pytest.approx(-math.log(sig(0.4)), rel=1e-6)
    assert f_w.item() == pytest.approx(-math.log(sig(-0.9)), rel=1e-6)


def test_bco_pushes_successes_up_and_failures_down():
    rewards = torch.zeros(4, requires_grad=True)
    s, f = bco_loss_terms(rewards, torch.tensor([True, True, False, False]), 0.0)
    (s + f).backward()
    assert (rewards.grad[:2] < 0).all() and (rewards.grad[2:] > 0).all()


def test_delta_is_a_bias_corrected_ema_of_batch_means():
    first = ema_update(0.0, 1.0, momentum=0.9)
    assert bias_corrected(first, 1, momentum=0.9) == pytest.approx(1.0)
    second = ema_update(first, 2.0, momentum=0.9)
    assert second == pytest.approx(0.9 * 0.1 + 0.1 * 2.0)
    assert bias_corrected(second, 2, momentum=0.9) == pytest.approx(second / (1 - 0.81))
    assert bias_corrected(0.0, 0, momentum=0.9) == 0.0  # before any E-step


def test_adaptive_beta_moves_toward_the_target_and_is_clamped():
    assert adapt_beta(0.1, 1.0, 0.5, 0.1, 1e-3, 10) == pytest.approx(0.1 * math.exp(0.1))
    assert adapt_beta(0.1, 0.1, 0.5, 0.1, 1e-3, 10) == pytest.approx(0.1 * math.exp(-0.1))
    assert adapt_beta(9.99, 5.0, 0.5, 0.1, 1e-3, 10) == 10
    assert adapt_beta(0.1, float("nan"), 0.5, 0.1, 1e-3, 10) == 0.1


def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    adv = group_advantages(rewards, 3, normalize_std=False)
    torch.testing.assert_close(adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3]))
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(rewards, 4, normalize_std=False)
    # TRL's default scaling: the unbiased std of the group (1/sqrt(3) here) plus 1e-4
    scaled = group_advantages(rewards, 3, normalize_std=True)
    expected = torch.tensor([2 / 3, -1 / 3, -1 / 3]) / (1 / math.sqrt(3) + 1e-4)
    torch.testing.assert_close(scaled[:3], expected)
    assert scaled[:3].std().item() == pytest.approx(1.0, rel=1e-3)
    flat = group_advantages(torch.ones(4), 4, normalize_std=True)
    assert torch.equal(flat, torch.zeros(4))  # equal rewards: no signal, no division by zero


def test_grpo_surrogate_clips_asymmetrically():
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1]))
    old = torch.zeros(3)
    adv = torch.tensor([1.0, -1.0, 1.0])
    loss = grpo_token_loss(logp, old, adv, clip_low=0.2, clip_high=0.28)
    torch.testing.assert_close(loss, torch.tensor([-1.28, 0.8, -1.1]))


def test_pass_at_k_is_unbiased_and_metrics_average_over_prompts():
    assert unbiased_pass_at_k(4, 0, 1) == 0.0
    assert unbiased_pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert unbiased_pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)
    assert unbiased_pass_at_k(4, 3, 2) == 1.0
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.5, 0.0]])
    mean, p1, p2 = MeanAtN(), PassAtK(1), PassAtK(2)
    for m in (mean, p1, p2):
        m.update(rewards)
    assert mean.compute().item() == pytest.approx((0.25 + 0.625) / 2)
    assert p1.compute().item() == pytest.approx((0.25 + 0.5) / 2)
    assert p2.compute().item() == pytest.approx((0.5 + (1 - 1 / 6)) / 2)
