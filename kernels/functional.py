"""The public functions: check the arguments, build the settings, choose the backend, run an
autograd Function on rows (it takes the backend), and give the results the tokens' shape."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from vpd_kernels import fused_linear
from vpd_kernels.backend import Backend, Targets
from vpd_kernels.checks import (
    check_backward_dtype,
    check_bias,
    check_floating,
    check_head_transform,
    check_labels,
    check_like,
    check_linear,
    check_same_tokens,
    check_temperature,
    check_tokens,
    check_topk,
    check_tuning,
    mask_weights,
)
from vpd_kernels.functions import DistillFunction, TokenLogprobsFunction
from vpd_kernels.fused_linear import (
    Constants,
    FusedLinearDistillFunction,
    FusedLinearLogprobsFunction,
    Head,
    backward_dtype_for,
)
from vpd_kernels.rows import as_rows, rows_per_chunk
from vpd_kernels.settings import LossSettings


class DistillStats(NamedTuple):
    """Detached per-token float32 statistics, shape (...) like the loss with reduction="none".

    They are not weighted by the mask: apply it yourself when averaging for logs.
    """

    divergence: torch.Tensor  # the chosen divergence (full or top-k) at temperature T
    ref_kl: torch.Tensor | None  # KL(softmax(student) || softmax(ref)) at T=1; None without a ref
    entropy: torch.Tensor  # entropy of softmax(student / T) over the full vocabulary
    cross_entropy: torch.Tensor | None = None  # -log softmax(student)[label] at T=1, with labels


def _within_vocabulary(settings: LossSettings, n_cols: int) -> LossSettings:
    """A teacher top-k that covers the whole vocabulary is the full divergence."""
    if settings.teacher_topk is not None and settings.teacher_topk >= n_cols:
        return dataclasses.replace(settings, teacher_topk=None)
    return settings


def _weights_and_labels(
    mask,
    labels,
    ignore_index,
    settings: LossSettings,
    return_stats: bool,
    token_shape,
    device,
    n_cols,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token weights (mask times "label is not ignore_index") and the label ids the kernels
    need for the cross-entropy (None when neither ce_coef nor the statistics want it)."""
    weights = mask_weights(mask, token_shape, device)
    if labels is None:
        if settings.ce_coef != 0:
            raise ValueError(
                f"ce_coef={settings.ce_coef} needs labels; pass labels=... or set ce_coef=0"
            )
        if ignore_index is not None:
            raise ValueError(f"ignore_index={ignore_index} needs labels; pass labels=... too")
        return weights, None
    ids, valid = check_labels(labels, ignore_index, token_shape, device, n_cols)
    return weights * valid, ids if settings.ce_coef != 0 or return_stats else None


def _shape_outputs(
    rows: tuple[torch.Tensor, ...],
    token_shape: torch.Size,
    settings: LossSettings,
    has_ref: bool,
    has_ce: bool,
    return_stats: bool,
) -> torch.Tensor | tuple[torch.Tensor, DistillStats]:
    """Shape the loss like the tokens for reduction="none" and attach the per-token statistics."""
    loss, divergence, ref_kl, entropy, cross_entropy = rows
    if settings.reduction == "none":
        loss = loss.view(token_shape)
    if not return_stats:
        return loss
    stats = DistillStats(
        divergence.view(token_shape),
        ref_kl.view(token_shape) if has_ref else None,
        entropy.view(token_shape),
        cross_entropy.view(token_shape) if has_ce else None,
    )
    return loss, stats


def _check_logits(student_logits, teacher_logits, ref_logits, ref_coef) -> None:
    check_floating("student_logits", student_logits)
    if teacher_logits is not None:
        check_like("teacher_logits", teacher_logits, "student_logits", student_logits)
    if ref_logits is not None:
        check_like("ref_logits", ref_logits, "student_logits", student_logits)
    elif ref_coef != 0:
        raise ValueError(f"ref_coef={ref_coef} needs ref_logits; pass them or set ref_coef=0")


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
    labels: torch.Tensor | None = None,
    ignore_index: int | None = None,
    ce_coef: float = 0.0,
    teacher_topk: int | None = None,
    topk_tail: bool = True,
    topk_from: str = "teacher",
    reduction: str = "mean",
    backend: str = "auto",
    return_stats: bool = False,
    block_v: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, DistillStats]:
    """Token-level distillation loss between student and teacher logits of shape (..., V).

    Per token: D(student, teacher) at temperature T + ref_coef * KL(student || ref) at T=1 +
    ce_coef * cross-entropy with `labels` at T=1. Tokens are weighted by `mask` and, with
    `labels`, skipped where labels == ignore_index. `teacher_topk=k` takes D over the teacher's
    k most likely tokens (plus, with `topk_tail`, one bucket for the rest), as
    `topk_distill_loss` does with a given top-k; `topk_from="student"` ranks the student's
    tokens instead (SDPO's reference). Gradients flow to `student_logits` only. With
    `return_stats=True` returns `(loss, DistillStats)`, computed in the same pass. `block_v` /
    `chunk_size` tune the Triton tile / torch chunk (None: automatic).
    """
    settings = LossSettings.of(locals())
    check_tuning(block_v, chunk_size)
    _check_logits(student_logits, teacher_logits, ref_logits, ref_coef)
    n_cols = student_logits.shape[-1]
    settings = _within_vocabulary(settings, n_cols)
    chosen = Backend.choose(backend, student_logits.device, block_v, chunk_size)
    token_shape = student_logits.shape[:-1]
    weights, label_ids = _weights_and_labels(
        mask,
        labels,
        ignore_index,
        settings,
        return_stats,
        token_shape,
        student_logits.device,
        n_cols,
    )
    ref = as_rows(ref_logits.detach()) if ref_logits is not None else None
    targets = Targets(as_rows(teacher_logits.detach()), ref, label_ids)
    rows = DistillFunction.apply(as_rows(student_logits), weights, chosen, targets, settings)
    return _shape_outputs(
        rows, token_shape, settings, ref is not None, label_ids is not None, return_stats
    )


def topk_distill_loss(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    *,
    tail: bool = True,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    ref_logits: torch.Tensor | None = None,
    ref_coef: float = 0.0,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int | None = None,
    ce_coef: float = 0.0,
    reduction: str = "mean",
    backend: str = "auto",
    return_stats: bool = False,
    block_v: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, DistillStats]:
    """Distillation from a teacher given as its top-k tokens: ids (..., k) and their
    log-probabilities (..., k) (e.g. from an inference server, at temperature T).

    The student's log-softmax at T over the full vocabulary (..., V) is read at the k ids; the
    divergence is taken over k + 1 buckets, the k tokens and the rest of each distribution
    (1 - its top-k mass), with `tail`, else over the k tokens renormalised (k = V has no rest:
    then `tail` is ignored). Other keywords as in `distill_loss`; gradients reach the student
    logits over the whole vocabulary. Ids must be distinct per token and in [0, V) (checked on
    weighted tokens, one host sync); tokens with weight 0 may hold any ids.
    """
    settings = LossSettings.of(locals())
    check_tuning(block_v, chunk_size)
    _check_logits(student_logits, None, ref_logits, ref_coef)
    n_cols = student_logits.shape[-1]
    chosen = Backend.choose(backend, student_logits.device, block_v, chunk_size)
    token_shape = student_logits.shape[:-1]
    device = student_logits.device
    weights, label_ids = _weights_and_labels(
        mask, labels, ignore_index, settings, return_stats, token_shape, device, n_cols
    )
    ids, logprobs = check_topk(
        teacher_topk_ids, teacher_topk_logprobs, token_shape, device, n_cols, weights != 0
    )
    if ids.shape[1] == n_cols:  # no rest of the distribution to bucket
        settings = dataclasses.replace(settings, tail=False)
    ref = as_rows(ref_logits.detach()) if ref_logits is not None else None
    targets = Targets(None, ref, label_ids, ids=ids, teacher_logprobs=logprobs)
    rows = DistillFunction.apply(as_rows(student_logits), weights, chosen, targets, settings)
    return _shape_outputs(
        rows, token_shape, settings, ref is not None, label_ids is not None, return_stats
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
    """log softmax(logits / T)[token] for logits (..., V) and integer tokens (...) in [0, V);
    float32 (...). Differentiable with respect to `logits`.
    """
    check_floating("logits", logits)
    check_temperature(temperature)
    check_tuning(block_v, chunk_size)
    token_shape = logits.shape[:-1]
    flat_tokens = check_tokens(tokens, token_shape, logits.device, logits.shape[-1])
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
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_final_logit_softcapping: float | None = None,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    ref_coef: float = 0.0,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int | None = None,
    ce_coef: float = 0.0,
    teacher_topk: int | None = None,
    topk_tail: bool = True,
    topk_from: str = "teacher",
    reduction: str = "mean",
    backend: str = "auto",
    return_stats: bool = False,
    chunk_size: int | None = None,
    block_v: int | None = None,
    backward_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, DistillStats]:
    """`distill_loss` on logits = hidden @ weight.T (+ bias), computed chunk by chunk.

    `teacher_weight` / `ref_weight` default to `student_weight` (a shared, or frozen, LM head);
    biases default to none. Gradients flow to `student_hidden`, `student_weight` and
    `student_bias` only. `logit_scale` and `final_logit_softcapping` transform the student's (and
    the ref's) logits as Cohere and Gemma 2/3 do, softcap * tanh(scale * logits / softcap),
    `teacher_logit_scale` / `teacher_final_logit_softcapping` the teacher's (each model's own
    config: pass both for self-distillation). Logits are float32 whatever the inputs' dtype.
    `chunk_size` is the number of rows per chunk (None: about 2**26 logits per chunk);
    `teacher_topk` takes the top-k chunk by chunk. `backward_dtype` is the gradient tile's dtype
    in the backward GEMMs: None = the weight's where that is fast (CUDA), float32 elsewhere;
    bfloat16 / float16 round the tile once and accumulate in float32 (tensor cores).
    """
    return fused_linear_distill(
        LossSettings.of(locals()),
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        ref_bias=ref_bias,
        transforms=(logit_scale, final_logit_softcapping),
        teacher_transforms=(teacher_logit_scale, teacher_final_logit_softcapping),
        mask=mask,
        labels=labels,
        ignore_index=ignore_index,
        backend=backend,
        return_stats=return_stats,
        chunk_size=chunk_size,
        block_v=block_v,
        backward_dtype=backward_dtype,
    )


def fused_linear_distill(
    settings: LossSettings,
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor | None,
    *,
    ref_hidden: torch.Tensor | None,
    ref_weight: torch.Tensor | None,
    student_bias: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    ref_bias: torch.Tensor | None,
    transforms: tuple[float, float | None],
    teacher_transforms: tuple[float, float | None],
    mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    ignore_index: int | None,
    backend: str,
    return_stats: bool,
    chunk_size: int | None,
    block_v: int | None,
    backward_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, DistillStats]:
    """`fused_linear_distill_loss` with validated settings (compat.liger sets div_coef too)."""
    check_tuning(block_v, chunk_size)
    check_backward_dtype(backward_dtype)
    check_head_transform("", *transforms)
    check_head_transform("teacher_", *teacher_transforms)
    teacher_weight = student_weight if teacher_weight is None else teacher_weight
    ref_weight = student_weight if ref_weight is None else ref_weight
    check_linear("student_hidden", student_hidden, "student_weight", student_weight)
    check_linear("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight)
    check_same_tokens("teacher", teacher_hidden, teacher_weight, student_hidden, student_weight)
    check_bias("student_bias", student_bias, "student_weight", student_weight)
    check_bias("teacher_bias", teacher_bias, "teacher_weight", teacher_weight)
    if ref_hidden is not None:
        check_linear("ref_hidden", ref_hidden, "ref_weight", ref_weight)
        check_same_tokens("ref", ref_hidden, ref_weight, student_hidden, student_weight)
        check_bias("ref_bias", ref_bias, "ref_weight", ref_weight)
    elif settings.ref_coef != 0:
        raise ValueError(
            f"ref_coef={settings.ref_coef} needs ref_hidden; pass it or set ref_coef=0"
        )
    n_cols = student_weight.shape[0]
    settings = _within_vocabulary(settings, n_cols)
    token_shape = student_hidden.shape[:-1]
    device = student_hidden.device
    chosen = Backend.choose(backend, device, block_v)
    weights, label_ids = _weights_and_labels(
        mask, labels, ignore_index, settings, return_stats, token_shape, device, n_cols
    )
    constants = Constants(
        as_rows(teacher_hidden.detach()),
        Head(teacher_weight.detach(), _detached(teacher_bias), *teacher_transforms),
        as_rows(ref_hidden.detach()) if ref_hidden is not None else None,
        Head(ref_weight.detach(), _detached(ref_bias), *transforms),
        label_ids,
        settings,
        chosen,
        rows_per_chunk(n_cols, chunk_size, fused_linear.CHUNK_LOGITS),
        backward_dtype_for(backward_dtype, student_weight),
        *transforms,
    )
    rows = FusedLinearDistillFunction.apply(
        as_rows(student_hidden), student_weight, student_bias, weights, constants
    )
    return _shape_outputs(
        rows, token_shape, settings, ref_hidden is not None, label_ids is not None, return_stats
    )


def _detached(x: torch.Tensor | None) -> torch.Tensor | None:
    return x.detach() if x is not None else None


def fused_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    temperature: float = 1.0,
    backend: str = "auto",
    chunk_size: int | None = None,
    block_v: int | None = None,
    backward_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """log softmax(z / T)[token] with z = hidden @ weight.T (+ bias), transformed by
    `logit_scale` / `final_logit_softcapping` as in `fused_linear_distill_loss`; float32 (...),
    without the (N, V) logits (float32 chunk by chunk whatever the inputs' dtype).

    Differentiable wrt `hidden`, `weight` and `bias`; the backward recomputes the logits chunk by
    chunk (one more matmul) instead of keeping them. Tokens must lie in [0, V).
    """
    check_linear("hidden", hidden, "weight", weight)
    check_bias("bias", bias, "weight", weight)
    check_head_transform("", logit_scale, final_logit_softcapping)
    check_temperature(temperature)
    check_tuning(block_v, chunk_size)
    check_backward_dtype(backward_dtype)
    token_shape = hidden.shape[:-1]
    flat_tokens = check_tokens(tokens, token_shape, hidden.device, weight.shape[0])
    chosen = Backend.choose(backend, hidden.device, block_v)
    chunk = rows_per_chunk(weight.shape[0], chunk_size, fused_linear.CHUNK_LOGITS)
    transform = (float(logit_scale), final_logit_softcapping)
    logp = FusedLinearLogprobsFunction.apply(
        as_rows(hidden),
        weight,
        bias,
        flat_tokens,
        transform,
        float(temperature),
        chosen,
        chunk,
        backward_dtype_for(backward_dtype, weight),
    )
    return logp.view(token_shape)
