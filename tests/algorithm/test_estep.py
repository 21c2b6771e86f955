"""The E-step as an object, without a Trainer: its cadence, δ, β, the buffer, its state, and the
prior's single pass, run with a one-process `UpdateRunner`."""

from __future__ import annotations

import math

import pytest
import torch

from vpd_lightning.algorithm.batches import micro_batches
from vpd_lightning.algorithm.estep import EStep, prior_pass
from vpd_lightning.options import EStepOptions
from vpd_lightning.policy.roles import Policy, TeacherWeights
from vpd_lightning.policy.tiny import build_tiny_model
from vpd_lightning.rollout.sampling import Rollout

PAD = 0


class OneProcess:
    """The training loop's side for one process: plain backward, SGD steps, a record of them."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float = 0.1) -> None:
        self.optimizer = torch.optim.SGD(params, lr=lr)
        self.steps: list[tuple[str, float, bool]] = []

    def sum(self, values):
        return [float(v) for v in values]

    def backward(self, loss):
        loss.backward()

    def step(self, role, loss, counted):
        self.steps.append((role, loss, counted))
        finite = math.isfinite(loss)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return 1.0, not finite


def rollouts(rewards: list[float]) -> list[Rollout]:
    return [
        Rollout(
            prompt_ids=[5, 6, 7],
            completion_ids=[40 + i, 41, 42][: 1 + i % 3],
            teacher_prompt_ids=[5, 6, 7, 30, 31],
            reward=reward,
            has_context=True,
        )
        for i, reward in enumerate(rewards)
    ]


@pytest.fixture
def policy(tiny_tokenizer) -> Policy:
    torch.manual_seed(0)
    return Policy(build_tiny_model(len(tiny_tokenizer)), None, False, TeacherWeights())


def test_cadence_and_buffer():
    estep = EStep(EStepOptions(every=3), success_threshold=1.0)
    assert [estep.add(rollouts([1.0, 0.0])) for _ in range(3)] == [False, False, True]
    assert len(estep.buffer) == 6 and estep.steps_since == 3


def test_every_zero_switches_the_e_step_off_and_buffers_nothing():
    estep = EStep(EStepOptions(every=0), success_threshold=1.0)
    assert not any(estep.add(rollouts([1.0, 0.0])) for _ in range(5))
    assert estep.buffer == [] and estep.steps_since == 0


def test_an_update_feeds_delta_first_trains_the_teacher_and_empties_the_buffer(policy):
    options = EStepOptions(every=1, beta=0.5, delta_momentum=0.9)
    estep = EStep(options, success_threshold=1.0)
    estep.add(rollouts([1.0, 0.0, 1.0, 0.0, 0.0]))
    batches = micro_batches(estep.buffer, 2, PAD, "cpu")
    expected = torch.cat(
        [
            prior_pass(
                policy, b.student, b.teacher, options=options, beta=0.5, lengths=b.lengths
            ).rewards
            for b in batches
        ]
    )
    before = [p.detach().clone() for p in policy.parameters()]
    runner = OneProcess(list(policy.parameters()))
    stats = estep.update(policy, batches, runner)

    # delta is this buffer's mean implicit reward (bias-corrected), before the update
    assert estep.delta == pytest.approx(float(expected.double().mean()), rel=1e-6)
    assert stats["estep/implicit_reward"] == pytest.approx(estep.delta, rel=1e-6)
    assert runner.steps == [("teacher", stats["estep/loss"], False)]
    assert any(not torch.equal(a, p) for a, p in zip(before, policy.parameters(), strict=True))
    assert estep.buffer == [] and estep.steps_since == 0
    assert "estep/margin" in stats and "estep/teacher_kl" not in stats


def test_the_prior_runs_once_per_micro_batch(policy, monkeypatch):
    """δ's pass keeps the prior's log-probs for the loss pass: one prior forward per micro-batch."""
    calls = []
    real = Policy.prior_features

    def counting(self, batch):
        calls.append(batch.num_sequences)
        return real(self, batch)

    monkeypatch.setattr(Policy, "prior_features", counting)
    estep = EStep(EStepOptions(every=1), success_threshold=1.0)
    estep.add(rollouts([1.0, 0.0, 1.0]))
    batches = micro_batches(estep.buffer, 2, PAD, "cpu")
    estep.update(policy, batches, OneProcess(list(policy.parameters())))
    assert calls == [2, 1]


def test_beta_adapts_and_the_state_round_trips(policy):
    options = EStepOptions(every=1, target_kl=1e-9, beta_rate=0.5)
    estep = EStep(options, success_threshold=1.0)
    estep.add(rollouts([1.0, 0.0]))
    stats = estep.update(
        policy, micro_batches(estep.buffer, 4, PAD, "cpu"), OneProcess(list(policy.parameters()))
    )
    assert stats["estep/teacher_kl"] >= 0
    assert estep.beta == pytest.approx(0.1 * math.exp(0.5))
    restored = EStep(options, success_threshold=1.0)
    restored.load_state_dict(estep.state_dict())
    assert restored.state_dict() == estep.state_dict()
    assert restored.delta == estep.delta and restored.beta == estep.beta


def test_a_nonfinite_loss_is_reported_to_the_runner(policy):
    """The runner decides the skip: the E-step hands it the loss as it is."""
    estep = EStep(EStepOptions(every=1), success_threshold=1.0)
    estep.add(rollouts([1.0, 0.0]))
    with torch.no_grad():
        next(policy.parameters()).fill_(float("nan"))
    runner = OneProcess(list(policy.parameters()))
    stats = estep.update(policy, micro_batches(estep.buffer, 4, PAD, "cpu"), runner)
    assert stats["estep/skipped"] == 1.0 and not math.isfinite(runner.steps[0][1])
