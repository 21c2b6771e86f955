"""The autograd Functions of the logits-in losses. Each takes the `Backend` that computes its rows
(Triton launchers or torch rows) and what the rows are compared with; nothing else is passed in.

The distillation gradient is produced in the forward (one more read of the logits is all it costs)
and the backward only scales it by grad_output, in place, as Liger-Kernel does for its fused
losses. The log-prob gradient depends on the per-token grad_output, so it is computed in backward.
"""

from __future__ import annotations

import torch

from vpd_kernels.backend import Backend, Targets
from vpd_kernels.rows import reduce_rows, row_coefficients, scale_grad
from vpd_kernels.settings import LossSettings


class DistillFunction(torch.autograd.Function):
    """(reduced loss, divergence, ref_kl, entropy, cross_entropy) of (outer, inner, V) student
    rows; the per-row statistics are not differentiable."""

    @staticmethod
    def forward(ctx, student, weights, backend: Backend, targets: Targets, settings: LossSettings):
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.empty(student.shape, device=student.device, dtype=student.dtype)
        coef = row_coefficients(weights, settings.reduction)
        rows = backend.rows(student, targets, coef, grad, settings)
        ctx.save_for_backward(grad)
        stats = rows[1:]
        ctx.mark_non_differentiable(*stats)
        return (reduce_rows(rows.loss, weights, settings.reduction), *stats)

    @staticmethod
    def backward(ctx, grad_loss, *_stats_grads):
        (grad,) = ctx.saved_tensors
        return scale_grad(grad, grad_loss), None, None, None, None


class TokenLogprobsFunction(torch.autograd.Function):
    """Forward keeps only the per-row normaliser; backward re-reads the logits."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature: float, backend: Backend):
        logp, norm = backend.logprobs(logits, tokens, temperature)
        ctx.save_for_backward(logits, tokens, norm)
        ctx.temperature, ctx.backend = temperature, backend
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        logits, tokens, norm = ctx.saved_tensors
        grad = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
        ctx.backend.logprobs_backward(
            logits, tokens, norm, grad_logp.contiguous(), ctx.temperature, grad
        )
        return grad, None, None, None
