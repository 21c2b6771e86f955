"""The functional API: check the arguments, choose the backend, run the op's autograd Function on
rows, and give the results the tokens' shape."""

from __future__ import annotations

from typing import NamedTuple

import torch

from vpd_kernels.backend import Backend
from vpd_kernels.checks import (
    LossSettings,
    check_floating,
    check_like,
    check_linear,
    check_same_tokens,
    check_temperature,
    check_tokens,
    check_tuning,
    mask_weights,
)
from vpd_kernels.ops import fused_linear
from vpd_kernels.ops.distill import DistillFunction
from vpd_kernels.ops.fused_linear import FusedLinearDistillFunction, FusedLinearLogprobsFunction
from vpd_kernels.ops.logprobs import TokenLogprobsFunction
from vpd_kernels.rows import as_rows, rows_per_chunk


class DistillStats(NamedTuple):
    """Detached per-token float32 statistics, shape (...) like the loss with reduction="none".

    They are not weighted by the mask: apply it yourself when averaging for logs.
    """

    divergence: torch.Tensor  # the chosen divergence between softmax(student/T), softmax(teacher/T)
    ref_kl: torch.Tensor | None  # KL(softmax(student) || softmax(ref)) at T=1; None without a ref
    entropy: torch.Tensor  # entropy of softmax(student/T)


def _shape_outputs(
    loss: torch.Tensor,
    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    token_shape: torch.Size,
    reduction: str,
    has_ref: bool,
    return_stats: bool,
) -> torch.Tensor | tuple[torch.Tensor, DistillStats]:
    """Shape the loss like the tokens for reduction="none" and attach the per-token statistics."""
    if reduction == "none":
        loss = loss.view(token_shape)
    if not return_stats:
        return loss
    divergence, ref_kl, entropy = rows
    stats = DistillStats(
        divergence.view(token_shape),
        ref_kl.view(token_shape) if has_ref else None,
        entropy.view(token_shape),
    )
    return loss, stats


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
    settings = LossSettings(divergence, beta, temperature, ref_coef, reduction)
    check_tuning(block_v, chunk_size)
    check_floating("student_logits", student_logits)
    check_like("teacher_logits", teacher_logits, "student_logits", student_logits)
    if ref_logits is not None:
        check_like("ref_logits", ref_logits, "student_logits", student_logits)
    elif ref_coef != 0:
        raise ValueError(f"ref_coef={ref_coef} needs ref_logits; pass them or set ref_coef=0")
    chosen = Backend.choose(backend, student_logits.device, block_v, chunk_size)
    token_shape = student_logits.shape[:-1]
    weights = mask_weights(mask, token_shape, student_logits.device)
    ref_rows = as_rows(ref_logits.detach()) if ref_logits is not None else None
    loss, div, ref_kl, entropy = DistillFunction.apply(
        as_rows(student_logits),
        as_rows(teacher_logits.detach()),
        ref_rows,
        weights,
        settings,
        chosen,
    )
    return _shape_outputs(
        loss, (div, ref_kl, entropy), token_shape, reduction, ref_logits is not None, return_stats
    )


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
    check_temperature(temperature)
    check_tuning(block_v, chunk_size)
    token_shape = logits.shape[:-1]
    flat_tokens = check_tokens(tokens, token_shape, logits.device)
    chosen = Backend.choose(backend, logits.device, block_v, chunk_size)
    logp = TokenLogprobsFunction.apply(as_rows(logits), flat_tokens, float(temperature), chosen)
    return logp.view(token_shape)


def fused_linear_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor | None = None,
    *,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    ref_coef: float = 0.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    return_stats: bool = False,
    chunk_size: int | None = None,
    block_v: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, DistillStats]:
    """`distill_loss` on student logits hidden @ weight.T (no bias), computed chunk by chunk.

    `teacher_weight` / `ref_weight` default to `student_weight` (a shared, or frozen, LM head).
    Gradients flow to `student_hidden` and `student_weight` only. `chunk_size` is the number of
    rows per chunk (None: about 2**27 logits per chunk).
    """
    settings = LossSettings(divergence, beta, temperature, ref_coef, reduction)
    check_tuning(block_v, chunk_size)
    teacher_weight = student_weight if teacher_weight is None else teacher_weight
    ref_weight = student_weight if ref_weight is None else ref_weight
    check_linear("student_hidden", student_hidden, "student_weight", student_weight)
    check_linear("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight)
    check_same_tokens("teacher", teacher_hidden, teacher_weight, student_hidden, student_weight)
    if ref_hidden is not None:
        check_linear("ref_hidden", ref_hidden, "ref_weight", ref_weight)
        check_same_tokens("ref", ref_hidden, ref_weight, student_hidden, student_weight)
    elif ref_coef != 0:
        raise ValueError(f"ref_coef={ref_coef} needs ref_hidden; pass it or set ref_coef=0")
    token_shape = student_hidden.shape[:-1]
    chosen = Backend.choose(backend, student_hidden.device, block_v)
    weights = mask_weights(mask, token_shape, student_hidden.device)
    chunk = rows_per_chunk(student_weight.shape[0], chunk_size, fused_linear.CHUNK_LOGITS)
    ref_rows = as_rows(ref_hidden.detach()) if ref_hidden is not None else None
    loss, div, ref_kl, entropy = FusedLinearDistillFunction.apply(
        as_rows(student_hidden),
        student_weight,
        as_rows(teacher_hidden.detach()),
        teacher_weight.detach(),
        ref_rows,
        ref_weight.detach(),
        weights,
        settings,
        chosen,
        chunk,
    )
    return _shape_outputs(
        loss, (div, ref_kl, entropy), token_shape, reduction, ref_hidden is not None, return_stats
    )


def fused_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    backend: str = "auto",
    chunk_size: int | None = None,
    block_v: int | None = None,
) -> torch.Tensor:
    """log softmax(hidden @ weight.T / T)[token], float32 (...), without the (N, V) logits.

    Differentiable wrt `hidden` and `weight`; the backward recomputes the logits chunk by chunk
    (one more matmul) instead of keeping them.
    """
    check_linear("hidden", hidden, "weight", weight)
    check_temperature(temperature)
    check_tuning(block_v, chunk_size)
    token_shape = hidden.shape[:-1]
    flat_tokens = check_tokens(tokens, token_shape, hidden.device)
    chosen = Backend.choose(backend, hidden.device, block_v)
    chunk = rows_per_chunk(weight.shape[0], chunk_size, fused_linear.CHUNK_LOGITS)
    logp = FusedLinearLogprobsFunction.apply(
        as_rows(hidden), weight, flat_tokens, float(temperature), chosen, chunk
    )
    return logp.view(token_shape)
