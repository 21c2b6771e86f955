"""Fused-linear losses: the autograd Functions that make logits = hidden @ weight.T chunk by chunk.

There is no kernel of its own here: each chunk's logits come from a torch matmul in the input
dtype, the distillation (or log-prob) rows of the chosen backend turn them into per-row values and
overwrite the student chunk with its gradient, and two more matmuls fold that into grad_hidden and
grad_weight. Peak memory is a few chunks of logits plus the gradients themselves, never (N, V).
"""

from __future__ import annotations

import torch

from vpd_kernels.checks import LossSettings
from vpd_kernels.rows import RowOutputs, reduce_rows, row_coefficients, scale_grad

CHUNK_LOGITS = 1 << 27  # logits per chunk: 256 MiB per bf16 stream (about 880 rows at V=152k)


def _distill_chunks(
    sh: torch.Tensor,
    sw: torch.Tensor,
    th: torch.Tensor,
    tw: torch.Tensor,
    rh: torch.Tensor | None,
    rw: torch.Tensor,
    coef: torch.Tensor,
    settings: LossSettings,
    backend,
    chunk: int,
    grad_h: torch.Tensor | None,
    grad_w: torch.Tensor | None,
) -> RowOutputs:
    """Per-row outputs for all rows; accumulates coef-scaled gradients into grad_h / grad_w.

    (s|t|r)h are (N, H) hidden rows and (s|t|r)w the (V, H) heads of student, teacher and ref.
    """
    n_rows = sh.shape[0]
    out = RowOutputs.empty(n_rows, sh.device)
    write_grad = grad_h is not None or grad_w is not None
    for lo in range(0, n_rows, chunk):
        hi = min(lo + chunk, n_rows)
        logits = sh[lo:hi] @ sw.T
        teacher = th[lo:hi] @ tw.T
        ref = rh[lo:hi] @ rw.T if rh is not None else None
        rows = backend.distill_rows(
            logits, teacher, ref, coef[lo:hi], logits if write_grad else None, settings
        )
        del teacher, ref
        for dst, src in zip(out, rows, strict=True):
            dst[lo:hi] = src
        if grad_h is not None:
            grad_h[lo:hi] = logits @ sw
        if grad_w is not None:
            grad_w.addmm_(logits.T, sh[lo:hi])
    return out


class FusedLinearDistillFunction(torch.autograd.Function):
    """Gradients in the forward for "mean"/"sum"; recomputed in backward for "none" (per-row grad)."""

    @staticmethod
    def forward(ctx, sh, sw, th, tw, rh, rw, weights, settings: LossSettings, backend, chunk: int):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        early = settings.reduction != "none"
        grad_h = torch.empty_like(sh) if need_h and early else None
        grad_w = torch.zeros_like(sw) if need_w and early else None
        coef = row_coefficients(weights, settings.reduction)
        rows = _distill_chunks(
            sh, sw, th, tw, rh, rw, coef, settings, backend, chunk, grad_h, grad_w
        )
        ctx.grads_ready = early
        if early:
            ctx.save_for_backward(grad_h, grad_w)
        else:
            ctx.save_for_backward(sh, sw, th, tw, rh, rw, weights)
            ctx.settings, ctx.backend, ctx.chunk = settings, backend, chunk
        ctx.mark_non_differentiable(rows.divergence, rows.ref_kl, rows.entropy)
        return (
            reduce_rows(rows.loss, weights, settings.reduction),
            rows.divergence,
            rows.ref_kl,
            rows.entropy,
        )

    @staticmethod
    def backward(ctx, grad_loss, *_stats_grads):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.grads_ready:
            grad_h, grad_w = ctx.saved_tensors
            grad_h, grad_w = scale_grad(grad_h, grad_loss), scale_grad(grad_w, grad_loss)
        else:
            sh, sw, th, tw, rh, rw, weights = ctx.saved_tensors
            grad_h = torch.empty_like(sh) if need_h else None
            grad_w = torch.zeros_like(sw) if need_w else None
            coef = weights * grad_loss.float()
            _distill_chunks(
                sh, sw, th, tw, rh, rw, coef, ctx.settings, ctx.backend, ctx.chunk, grad_h, grad_w
            )
        return grad_h, grad_w, None, None, None, None, None, None, None, None


class FusedLinearLogprobsFunction(torch.autograd.Function):
    """Forward keeps only the per-row log-sum-exp; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature: float, backend, chunk: int):
        logp = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
        lse = torch.empty_like(logp)
        for lo in range(0, hidden.shape[0], chunk):
            logp[lo : lo + chunk], lse[lo : lo + chunk] = backend.logprobs(
                hidden[lo : lo + chunk] @ weight.T, tokens[lo : lo + chunk], temperature
            )
        ctx.save_for_backward(hidden, weight, tokens, lse)
        ctx.temperature, ctx.backend, ctx.chunk = temperature, backend, chunk
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, tokens, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_logp = grad_logp.contiguous()
        for lo in range(0, hidden.shape[0], ctx.chunk):
            hi = lo + ctx.chunk
            logits = hidden[lo:hi] @ weight.T
            ctx.backend.logprobs_backward(
                logits, tokens[lo:hi], lse[lo:hi], grad_logp[lo:hi], ctx.temperature, logits
            )  # the gradient overwrites the logits chunk in place
            if grad_h is not None:
                grad_h[lo:hi] = logits @ weight
            if grad_w is not None:
                grad_w.addmm_(logits.T, hidden[lo:hi])
        return grad_h, grad_w, None, None, None, None
