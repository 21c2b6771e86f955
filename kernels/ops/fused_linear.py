"""Fused-linear losses: the autograd Functions that make logits = hidden @ weight.T (+ bias)
chunk by chunk.

There is no kernel of its own here: each chunk's logits come from a torch matmul in the input
dtype, the distillation (or log-prob) rows of the chosen backend turn them into per-row values and
overwrite the student chunk with its gradient, and more matmuls fold that into grad_hidden,
grad_weight (and grad_bias). Peak memory is a few chunks of logits plus the gradients
themselves, never (N, V). With `teacher_topk` the teacher's top-k is taken chunk by chunk too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vpd_kernels.checks import LossSettings
from vpd_kernels.rows import (
    RowOutputs,
    flat_rows,
    n_rows,
    reduce_rows,
    row_chunk,
    row_coefficients,
    scale_grad,
)

CHUNK_LOGITS = 1 << 27  # logits per chunk: 256 MiB per bf16 stream (about 880 rows at V=152k)


def linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)


@dataclass(frozen=True)
class Constants:
    """What the student's gradient does not flow into: teacher and ref (hidden rows as
    (outer, inner, H) views, heads, biases), labels (N,) for the cross-entropy, and the settings."""

    teacher_hidden: torch.Tensor
    teacher_weight: torch.Tensor
    teacher_bias: torch.Tensor | None
    ref_hidden: torch.Tensor | None
    ref_weight: torch.Tensor
    ref_bias: torch.Tensor | None
    labels: torch.Tensor | None
    settings: LossSettings
    backend: object  # backend.Backend
    chunk: int


def _distill_chunks(sh, sw, sb, coef, c: Constants, grad_h, grad_w, grad_b) -> RowOutputs:
    """Per-row outputs for all rows; accumulates coef-scaled gradients into grad_h / grad_w /
    grad_b (those that are not None)."""
    total = n_rows(sh)
    out = RowOutputs.empty(total, sh.device)
    write_grad = grad_h is not None or grad_w is not None or grad_b is not None
    for lo in range(0, total, c.chunk):
        hi = min(lo + c.chunk, total)
        hidden = row_chunk(sh, lo, hi)
        logits = linear(hidden, sw, sb)
        teacher = linear(row_chunk(c.teacher_hidden, lo, hi), c.teacher_weight, c.teacher_bias)
        ref = None
        if c.ref_hidden is not None:
            ref = linear(row_chunk(c.ref_hidden, lo, hi), c.ref_weight, c.ref_bias)[:, None]
        rows = c.backend.distill_rows(
            logits[:, None],
            teacher[:, None],
            ref,
            c.labels[lo:hi] if c.labels is not None else None,
            coef[lo:hi],
            logits[:, None] if write_grad else None,  # the gradient overwrites the logits
            c.settings,
        )
        del teacher, ref
        for dst, src in zip(out, rows, strict=True):
            dst[lo:hi] = src
        if grad_h is not None:
            flat_rows(grad_h)[lo:hi] = logits @ sw
        if grad_w is not None:
            grad_w.addmm_(logits.T, hidden)
        if grad_b is not None:
            grad_b += logits.sum(0)
    return out


class FusedLinearDistillFunction(torch.autograd.Function):
    """Gradients in the forward for "mean"/"sum"; recomputed in backward for "none" (per-row grad)."""

    @staticmethod
    def forward(ctx, sh, sw, sb, weights, c: Constants):
        need = ctx.needs_input_grad[:3]
        early = c.settings.reduction != "none"
        grads = _new_grads(sh, sw, sb, need) if early else (None, None, None)
        coef = row_coefficients(weights, c.settings.reduction)
        rows = _distill_chunks(sh, sw, sb, coef, c, *grads)
        ctx.grads_ready = early
        if early:
            ctx.save_for_backward(*grads)
        else:
            ctx.save_for_backward(sh, sw, sb, weights)
            ctx.constants = c
        stats = rows[1:]
        ctx.mark_non_differentiable(*stats)
        return (reduce_rows(rows.loss, weights, c.settings.reduction), *stats)

    @staticmethod
    def backward(ctx, grad_loss, *_stats_grads):
        if ctx.grads_ready:
            grads = tuple(scale_grad(g, grad_loss) for g in ctx.saved_tensors)
        else:
            sh, sw, sb, weights = ctx.saved_tensors
            grads = _new_grads(sh, sw, sb, ctx.needs_input_grad[:3])
            _distill_chunks(sh, sw, sb, weights * grad_loss.float(), ctx.constants, *grads)
        return *grads, None, None


def _new_grads(sh, sw, sb, need) -> tuple[torch.Tensor | None, ...]:
    """Buffers for grad_hidden (written chunk by chunk), grad_weight and grad_bias (summed)."""
    return (
        torch.empty(sh.shape, device=sh.device, dtype=sh.dtype) if need[0] else None,
        torch.zeros_like(sw) if need[1] else None,
        torch.zeros_like(sb) if sb is not None and need[2] else None,
    )


class FusedLinearLogprobsFunction(torch.autograd.Function):
    """Forward keeps only the per-row normaliser; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature: float, backend, chunk: int):
        total = n_rows(hidden)
        logp = torch.empty(total, device=hidden.device, dtype=torch.float32)
        norm = torch.empty(total, 2, device=hidden.device, dtype=torch.float32)
        for lo in range(0, total, chunk):
            hi = min(lo + chunk, total)
            logits = row_chunk(hidden, lo, hi) @ weight.T
            logp[lo:hi], norm[lo:hi] = backend.logprobs(logits[:, None], tokens[lo:hi], temperature)
        ctx.save_for_backward(hidden, weight, tokens, norm)
        ctx.temperature, ctx.backend, ctx.chunk = temperature, backend, chunk
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, tokens, norm = ctx.saved_tensors
        grad_h, grad_w, _ = _new_grads(hidden, weight, None, ctx.needs_input_grad[:2] + (False,))
        grad_logp = grad_logp.contiguous()
        total = n_rows(hidden)
        for lo in range(0, total, ctx.chunk):
            hi = min(lo + ctx.chunk, total)
            chunk_hidden = row_chunk(hidden, lo, hi)
            logits = chunk_hidden @ weight.T
            ctx.backend.logprobs_backward(
                logits[:, None],
                tokens[lo:hi],
                norm[lo:hi],
                grad_logp[lo:hi],
                ctx.temperature,
                logits[:, None],
            )  # the gradient overwrites the logits chunk in place
            if grad_h is not None:
                flat_rows(grad_h)[lo:hi] = logits @ weight
            if grad_w is not None:
                grad_w.addmm_(logits.T, chunk_hidden)
        return grad_h, grad_w, None, None, None, None
