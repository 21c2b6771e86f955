"""What the kernel tests share: inputs, independent float64 references (plain softmax math,
autograd for gradients) and comparisons. Test files import it relatively (`from .helpers import`),
as tests/trainer does; nothing else is shared between them."""

from __future__ import annotations

import torch
from torch.special import xlogy

BACKENDS = ["torch", "triton"]
DIVERGENCES = ["reverse_kl", "forward_kl", "jsd"]


def make_logits(*shape: int, seed: int, scale: float = 2.0) -> tuple[torch.Tensor, ...]:
    """Student, teacher and reference logits of `shape`, normal with standard deviation `scale`."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g) * scale for _ in range(3))


def kl64(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum p log(p / q) over the last dim with 0 log 0 = 0, in float64 probabilities."""
    return (xlogy(p, p) - xlogy(p, q)).sum(-1)


def divergence64(s: torch.Tensor, t: torch.Tensor, divergence: str, beta: float = 0.5):
    """The divergence between float64 probability rows s (student) and t (teacher)."""
    if divergence == "reverse_kl":
        return kl64(s, t)
    if divergence == "forward_kl":
        return kl64(t, s)
    m = (1 - beta) * s + beta * t
    return beta * kl64(t, m) + (1 - beta) * kl64(s, m)


def anchors64(student, ref=None, ref_coef=0.0, labels=None, ce_coef=0.0):
    """ref_coef * KL(softmax(student) || softmax(ref)) + ce_coef * CE(labels), float64 (...)."""
    log_p = torch.log_softmax(student.double(), -1)
    out = torch.zeros_like(log_p[..., 0])
    if ref is not None:
        out = out + ref_coef * kl64(log_p.exp(), torch.softmax(ref.double(), -1))
    if labels is not None:
        out = out - ce_coef * log_p.gather(-1, labels[..., None]).squeeze(-1)
    return out


def distill_rows64(
    student, teacher, divergence, beta=0.5, temperature=1.0, ref=None, ref_coef=0.0, **anchors
):
    """Per-token loss (...) in float64; differentiable wrt `student`."""
    s = torch.softmax(student.double() / temperature, -1)
    t = torch.softmax(teacher.double() / temperature, -1)
    return divergence64(s, t, divergence, beta) + anchors64(student, ref, ref_coef, **anchors)


def topk_rows64(
    student, ids, teacher_logprobs, divergence, beta=0.5, temperature=1.0, tail=True, **anchors
):
    """Per-token top-k loss (...) in float64: the student's probabilities at the teacher's ids and
    the teacher's, plus the rest of each (1 - their sum) with `tail`, else renormalised."""
    s = torch.softmax(student.double() / temperature, -1).gather(-1, ids)
    t = teacher_logprobs.double().exp()
    if tail:
        s = torch.cat([s, (1 - s.sum(-1, keepdim=True)).clamp_min(0)], -1)
        t = torch.cat([t, (1 - t.sum(-1, keepdim=True)).clamp_min(0)], -1)
    else:
        s, t = s / s.sum(-1, keepdim=True), t / t.sum(-1, keepdim=True)
    return divergence64(s, t, divergence, beta) + anchors64(student, **anchors)


def reduce64(rows: torch.Tensor, mask, reduction: str) -> torch.Tensor:
    w = torch.ones_like(rows) if mask is None else mask.double()
    if reduction == "none":
        return rows * w
    if reduction == "sum":
        return (rows * w).sum()
    return (rows * w).sum() / w.sum() if w.sum() != 0 else (rows * 0).sum()


def entropy64(student, temperature=1.0) -> torch.Tensor:
    s = torch.softmax(student.double() / temperature, -1)
    return -xlogy(s, s).sum(-1)


def token_logprobs64(logits, tokens, temperature=1.0) -> torch.Tensor:
    return (
        torch.log_softmax(logits.double() / temperature, -1)
        .gather(-1, tokens[..., None])
        .squeeze(-1)
    )


def loss_and_grad(fn, leaf: torch.Tensor, grad_out: torch.Tensor | None = None):
    """Evaluate fn(x) on a fresh leaf copy of `leaf` and return (value, d sum(value * grad_out) / dx)."""
    x = leaf.detach().clone().requires_grad_(True)
    value = fn(x)
    weight = torch.ones_like(value) if grad_out is None else grad_out.to(value.dtype)
    (value * weight).sum().backward()
    return value.detach(), x.grad


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (a scale-aware relative error for whole tensors)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().clamp_min(1e-12)
    return float((actual - expected).abs().max() / scale)


def assert_rel_close(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-9
) -> None:
    actual, expected = actual.detach(), expected.detach()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = float((actual.double() - expected.double()).abs().max()) if actual.numel() else 0.0
    bound = rtol * float(expected.double().abs().max()) + atol if actual.numel() else 0.0
    assert err <= bound, f"max abs err {err:.3e} > {bound:.3e} (rtol {rtol})"
