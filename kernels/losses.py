"""Logits-in API: `distill_loss` and `token_logprobs` with their autograd functions."""

from __future__ import annotations

import torch

from vpd_kernels.config import (
    DistillConfig,
    DistillStats,
    check_floating,
    check_like,
    check_tokens,
    finish_outputs,
    mask_weights,
    resolve_backend,
)
from vpd_kernels.engine import Engine
from vpd_kernels.rows import as_rows, reduce_rows, row_coefficients, scale_grad


class _DistillFunction(torch.autograd.Function):
    """Loss and gradient in one forward; backward only multiplies by grad_output."""

    @staticmethod
    def forward(ctx, student, teacher, ref, weights, cfg: DistillConfig, engine: Engine):
        grad = torch.empty_like(student) if ctx.needs_input_grad[0] else None
        coef = row_coefficients(weights, cfg.reduction)
        rows = engine.distill_rows(student, teacher, ref, coef, grad, cfg)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(rows.divergence, rows.ref_kl, rows.entropy)
        return (
            reduce_rows(rows.loss, weights, cfg.reduction),
            rows.divergence,
            rows.ref_kl,
            rows.entropy,
        )

    @staticmethod
    def backward(ctx, grad_loss, *_stats_grads):
        (grad,) = ctx.saved_tensors
        return scale_grad(grad, grad_loss), None, None, None, None, None


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    ref_logits: torch.Tensor | None = None,
    ref_coef: float = 0.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    return_stats: bool = False,
    block_v: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, DistillStats]:
    """Token-level distillation loss between student and teacher logits of shape (..., V).

    Gradients flow to `student_logits` only. With `return_stats=True` returns
    `(loss, DistillStats)` with per-token divergence, ref KL and student entropy, computed in the
    same pass. `block_v` / `chunk_size` tune the Triton tile / torch chunk (None: automatic).
    """
    cfg = DistillConfig(divergence, beta, temperature, ref_coef, reduction)
    check_floating("student_logits", student_logits)
    check_like("teacher_logits", teacher_logits, "student_logits", student_logits)
    if ref_logits is not None:
        check_like("ref_logits", ref_logits, "student_logits", student_logits)
    elif ref_coef != 0:
        raise ValueError(f"ref_coef={ref_coef} needs ref_logits; pass them or set ref_coef=0")
    engine = Engine(resolve_backend(backend, student_logits.device), block_v, chunk_size)
    token_shape = student_logits.shape[:-1]
    weights = mask_weights(mask, token_shape, student_logits.device)
    ref_rows = as_rows(ref_logits.detach()) if ref_logits is not None else None
    loss, div, ref_kl, entropy = _DistillFunction.apply(
        as_rows(student_logits), as_rows(teacher_logits.detach()), ref_rows, weights, cfg, engine
    )
    return finish_outputs(
        loss, (div, ref_kl, entropy), token_shape, reduction, ref_logits is not None, return_stats
    )


class _TokenLogprobsFunction(torch.autograd.Function):
    """Forward keeps only the per-row log-sum-exp; backward re-reads the logits."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature: float, engine: Engine):
        logp, lse = engine.logprobs(logits, tokens, temperature)
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature, ctx.engine = temperature, engine
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        logits, tokens, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        ctx.engine.logprobs_backward(
            logits, tokens, lse, grad_logp.contiguous(), ctx.temperature, grad
        )
        return grad, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    backend: str = "auto",
    block_v: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """log softmax(logits / T)[token] for logits (..., V) and integer tokens (...); float32 (...).

    Differentiable with respect to `logits`.
    """
    check_floating("logits", logits)
    DistillConfig(temperature=temperature)  # validates the temperature
    token_shape = logits.shape[:-1]
    flat_tokens = check_tokens(tokens, token_shape, logits.device)
    engine = Engine(resolve_backend(backend, logits.device), block_v, chunk_size)
    logp = _TokenLogprobsFunction.apply(as_rows(logits), flat_tokens, float(temperature), engine)
    return logp.view(token_shape)
