"""Fused-linear API: losses on logits = hidden @ weight.T without materialising all of them.

Rows are processed in chunks: the chunk's logits are made with a torch matmul in the input dtype,
the row kernel turns them into per-row losses and overwrites the student chunk with its gradient,
and two more matmuls fold that into grad_hidden and grad_weight. Peak memory is a few chunks of
logits plus the gradients themselves, never (N, V).
"""

from __future__ import annotations

import torch

from vpd_kernels.config import (
    DistillConfig,
    DistillStats,
    RowOutputs,
    check_floating,
    check_tokens,
    finish_outputs,
    mask_weights,
    resolve_backend,
)
from vpd_kernels.engine import Engine
from vpd_kernels.reference import chunk_rows
from vpd_kernels.rows import as_rows, reduce_rows, row_coefficients, scale_grad

CHUNK_LOGITS = 1 << 27  # logits per chunk: 256 MiB per bf16 stream (about 880 rows at V=152k)


def _check_linear(
    hidden_name: str, hidden: torch.Tensor, weight_name: str, weight: torch.Tensor
) -> None:
    """Raise unless hidden (..., H) and weight (V, H) can make logits together."""
    check_floating(hidden_name, hidden)
    check_floating(weight_name, weight)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{weight_name} must have shape (V, H) with H = {hidden_name}.shape[-1] = {hidden.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(
            f"{hidden_name} is {hidden.dtype} but {weight_name} is {weight.dtype}; cast one so they match"
        )
    if weight.device != hidden.device:
        raise ValueError(
            f"{hidden_name} is on {hidden.device} but {weight_name} is on {weight.device}"
        )


def _distill_chunks(
    sh: torch.Tensor,
    sw: torch.Tensor,
    th: torch.Tensor,
    tw: torch.Tensor,
    rh: torch.Tensor | None,
    rw: torch.Tensor,
    coef: torch.Tensor,
    cfg: DistillConfig,
    engine: Engine,
    chunk: int,
    grad_h: torch.Tensor | None,
    grad_w: torch.Tensor | None,
) -> RowOutputs:
    """Per-row outputs for all rows; accumulates coef-scaled gradients into grad_h / grad_w.

    (s|t|r)h are (N, H) hidden rows and (s|t|r)w the (V, H) heads of student, teacher and ref.
    """
    n_rows = sh.shape[0]
    out = RowOutputs(
        *(torch.empty(n_rows, device=sh.device, dtype=torch.float32) for _ in range(4))
    )
    write_grad = grad_h is not None or grad_w is not None
    for lo in range(0, n_rows, chunk):
        hi = min(lo + chunk, n_rows)
        logits = sh[lo:hi] @ sw.T
        teacher = th[lo:hi] @ tw.T
        ref = rh[lo:hi] @ rw.T if rh is not None else None
        rows = engine.distill_rows(
            logits, teacher, ref, coef[lo:hi], logits if write_grad else None, cfg
        )
        del teacher, ref
        for dst, src in zip(out, rows, strict=True):
            dst[lo:hi] = src
        if grad_h is not None:
            grad_h[lo:hi] = logits @ sw
        if grad_w is not None:
            grad_w.addmm_(logits.T, sh[lo:hi])
    return out


class _FusedLinearDistillFunction(torch.autograd.Function):
    """Gradients in the forward for "mean"/"sum"; recomputed in backward for "none" (per-row grad)."""

    @staticmethod
    def forward(
        ctx, sh, sw, th, tw, rh, rw, weights, cfg: DistillConfig, engine: Engine, chunk: int
    ):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        early = cfg.reduction != "none"
        grad_h = torch.empty_like(sh) if need_h and early else None
        grad_w = torch.zeros_like(sw) if need_w and early else None
        coef = row_coefficients(weights, cfg.reduction)
        rows = _distill_chunks(sh, sw, th, tw, rh, rw, coef, cfg, engine, chunk, grad_h, grad_w)
        ctx.grads_ready = early
        if early:
            ctx.save_for_backward(grad_h, grad_w)
        else:
            ctx.save_for_backward(sh, sw, th, tw, rh, rw, weights)
            ctx.cfg, ctx.engine, ctx.chunk = cfg, engine, chunk
        ctx.mark_non_differentiable(rows.divergence, rows.ref_kl, rows.entropy)
        return (
            reduce_rows(rows.loss, weights, cfg.reduction),
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
                sh, sw, th, tw, rh, rw, coef, ctx.cfg, ctx.engine, ctx.chunk, grad_h, grad_w
            )
        return grad_h, grad_w, None, None, None, None, None, None, None, None


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
    cfg = DistillConfig(divergence, beta, temperature, ref_coef, reduction)
    teacher_weight = student_weight if teacher_weight is None else teacher_weight
    ref_weight = student_weight if ref_weight is None else ref_weight
    _check_linear("student_hidden", student_hidden, "student_weight", student_weight)
    _check_linear("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight)
    pairs = [("teacher", teacher_hidden, teacher_weight)]
    if ref_hidden is not None:
        _check_linear("ref_hidden", ref_hidden, "ref_weight", ref_weight)
        pairs.append(("ref", ref_hidden, ref_weight))
    elif ref_coef != 0:
        raise ValueError(f"ref_coef={ref_coef} needs ref_hidden; pass it or set ref_coef=0")
    token_shape = student_hidden.shape[:-1]
    for name, hidden, weight in pairs:
        if hidden.shape[:-1] != token_shape or weight.shape[0] != student_weight.shape[0]:
            raise ValueError(
                f"{name}_hidden has {tuple(hidden.shape[:-1])} tokens and {name}_weight {weight.shape[0]} "
                f"vocabulary rows, but the student has {tuple(token_shape)} and {student_weight.shape[0]}; "
                "they must match"
            )
        if hidden.device != student_hidden.device:
            raise ValueError(
                f"{name}_hidden is on {hidden.device} but student_hidden is on {student_hidden.device}"
            )
    engine = Engine(resolve_backend(backend, student_hidden.device), block_v, None)
    weights = mask_weights(mask, token_shape, student_hidden.device)
    chunk = chunk_rows(student_weight.shape[0], chunk_size, CHUNK_LOGITS)
    ref_rows = as_rows(ref_hidden.detach()) if ref_hidden is not None else None
    loss, div, ref_kl, entropy = _FusedLinearDistillFunction.apply(
        as_rows(student_hidden),
        student_weight,
        as_rows(teacher_hidden.detach()),
        teacher_weight.detach(),
        ref_rows,
        ref_weight.detach(),
        weights,
        cfg,
        engine,
        chunk,
    )
    return finish_outputs(
        loss, (div, ref_kl, entropy), token_shape, reduction, ref_hidden is not None, return_stats
    )


class _FusedLinearLogprobsFunction(torch.autograd.Function):
    """Forward keeps only the per-row log-sum-exp; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature: float, engine: Engine, chunk: int):
        logp = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
        lse = torch.empty_like(logp)
        for lo in range(0, hidden.shape[0], chunk):
            logp[lo : lo + chunk], lse[lo : lo + chunk] = engine.logprobs(
                hidden[lo : lo + chunk] @ weight.T, tokens[lo : lo + chunk], temperature
            )
        ctx.save_for_backward(hidden, weight, tokens, lse)
        ctx.temperature, ctx.engine, ctx.chunk = temperature, engine, chunk
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
            ctx.engine.logprobs_backward(
                logits, tokens[lo:hi], lse[lo:hi], grad_logp[lo:hi], ctx.temperature, logits
            )  # the gradient overwrites the logits chunk in place
            if grad_h is not None:
                grad_h[lo:hi] = logits @ weight
            if grad_w is not None:
                grad_w.addmm_(logits.T, hidden[lo:hi])
        return grad_h, grad_w, None, None, None, None


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
    _check_linear("hidden", hidden, "weight", weight)
    DistillConfig(temperature=temperature)  # validates the temperature
    token_shape = hidden.shape[:-1]
    flat_tokens = check_tokens(tokens, token_shape, hidden.device)
    engine = Engine(resolve_backend(backend, hidden.device), block_v, None)
    chunk = chunk_rows(weight.shape[0], chunk_size, CHUNK_LOGITS)
    logp = _FusedLinearLogprobsFunction.apply(
        as_rows(hidden), weight, flat_tokens, float(temperature), engine, chunk
    )
    return logp.view(token_shape)
