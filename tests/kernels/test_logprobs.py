"""token_logprobs and fused_linear_token_logprobs against a float64 reference, both backends."""

from __future__ import annotations

import pytest
import torch

import vpd_kernels as vk

from .helpers import BACKENDS, assert_rel_close, loss_and_grad, max_rel_err, token_logprobs64

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [1, 7, 1031])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_token_logprobs(backend, vocab, temperature):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(3, 5, vocab, generator=g) * 3
    tokens = torch.randint(0, vocab, (3, 5), generator=g)
    grad_out = torch.randn(3, 5, generator=g)
    ours, grad = loss_and_grad(
        lambda x: vk.token_logprobs(
            x, tokens, temperature=temperature, backend=backend, block_v=256
        ),
        logits,
        grad_out,
    )
    expected, expected_grad = loss_and_grad(
        lambda x: token_logprobs64(x, tokens, temperature), logits.double(), grad_out
    )
    assert ours.dtype == torch.float32 and ours.shape == (3, 5)
    assert_rel_close(ours, expected, atol=1e-6)
    assert_rel_close(grad, expected_grad, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_minus_inf_and_bf16(backend):
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(0)) * 4
    logits[:, 30:] = float("-inf")  # padded vocabulary
    tokens = torch.tensor([0, 5, 29, 12])
    ours, grad = loss_and_grad(
        lambda x: vk.token_logprobs(x, tokens, backend=backend, block_v=16), logits
    )
    expected, expected_grad = loss_and_grad(
        lambda x: token_logprobs64(x, tokens), logits[:, :30].double()
    )
    assert_rel_close(ours, expected)
    assert_rel_close(grad[:, :30], expected_grad)
    assert not grad[:, 30:].any()
    half = logits[:, :30].bfloat16()
    eager_lp, eager_grad = loss_and_grad(
        lambda x: torch.log_softmax(x, -1).gather(-1, tokens[:, None]).squeeze(-1), half
    )
    ours_lp, ours_grad = loss_and_grad(
        lambda x: vk.token_logprobs(x, tokens, backend=backend), half
    )
    ref_lp, ref_grad = loss_and_grad(lambda x: token_logprobs64(x, tokens), half.double())
    assert ours_grad.dtype == torch.bfloat16
    assert max_rel_err(ours_lp, ref_lp) <= max_rel_err(eager_lp, ref_lp) + 1e-3
    assert max_rel_err(ours_grad, ref_grad) <= max_rel_err(eager_grad, ref_grad) + 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_fused_linear_token_logprobs(backend, temperature):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 5, 8, generator=g)
    weight = torch.randn(37, 8, generator=g)
    tokens = torch.randint(0, 37, (2, 5), generator=g)
    grad_out = torch.randn(2, 5, generator=g)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    lp = vk.fused_linear_token_logprobs(
        h, w, tokens, temperature=temperature, backend=backend, chunk_size=3, block_v=16
    )
    (lp * grad_out).sum().backward()
    h64 = hidden.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    expected = token_logprobs64(h64 @ w64.T, tokens, temperature)
    (expected * grad_out.double()).sum().backward()
    assert_rel_close(lp, expected.detach())
    assert_rel_close(h.grad, h64.grad)
    assert_rel_close(w.grad, w64.grad)


def test_fused_linear_token_logprobs_frozen_weight():
    hidden = torch.randn(6, 4, requires_grad=True)
    weight = torch.randn(9, 4)  # e.g. a frozen LM head under LoRA
    lp = vk.fused_linear_token_logprobs(hidden, weight, torch.arange(6), backend="torch")
    lp.sum().backward()
    assert hidden.grad is not None and weight.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.25, 0.5, 1.0])
def test_token_logprobs_exact_at_any_logit_scale(backend, temperature):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 50, generator=g) * 3
    tokens = torch.randint(0, 50, (2, 3), generator=g)
    for offset in (1e3, 1e4):
        shifted = logits + offset
        ours, grad = loss_and_grad(
            lambda x: vk.token_logprobs(
                x, tokens, temperature=temperature, backend=backend, block_v=16
            ),
            shifted,
        )
        expected, expected_grad = loss_and_grad(
            lambda x: token_logprobs64(x, tokens, temperature), shifted.double()
        )
        assert_rel_close(ours, expected, atol=1e-6)
        assert_rel_close(grad, expected_grad, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_ids_out_of_range_raise(backend):
    logits = torch.randn(2, 3, 10)
    tokens = torch.zeros(2, 3, dtype=torch.long)
    tokens[1, 2] = -100
    with pytest.raises(ValueError, match=r"tokens has 1 ids outside \[0, 10\).*-100"):
        vk.token_logprobs(logits, tokens, backend=backend)
    with pytest.raises(ValueError, match="outside"):
        vk.fused_linear_token_logprobs(torch.randn(2, 3, 4), torch.randn(10, 4), tokens + 10)
