"""Distillation loss: the Triton kernel, its launcher and the autograd Function.

The kernel computes the loss, per-token statistics and the gradient wrt the student logits.

One program owns a block of rows and walks the vocabulary in tiles:
- pass 1 keeps online log-sum-exps of every distribution and, for the KL divergences, online
  expectations, so that KL values and the entropy are known after one read;
- JSD only: pass 2 sums the mixture terms, which need the normalised probabilities;
- last pass (when a gradient is wanted) writes d loss_row / d student_logits, already multiplied by
  the row's coefficient (mask weight, / sum of weights for "mean"), in the student's dtype.
All arithmetic is float32 whatever the input dtype. Offsets are int64 so N * V may exceed 2**31.
"""

from __future__ import annotations

import torch

from vpd_kernels.checks import LossSettings
from vpd_kernels.ops import tl, triton
from vpd_kernels.ops.tiles import NEG_BIG, online_logsumexp, pick_tiles, weighted_sum
from vpd_kernels.rows import RowOutputs, reduce_rows, row_coefficients, scale_grad

_DIVERGENCE_IDS = {"reverse_kl": 0, "forward_kl": 1, "jsd": 2}


@triton.jit
def _distill_kernel(
    s_ptr,
    t_ptr,
    r_ptr,
    g_ptr,
    coef_ptr,
    loss_ptr,
    div_ptr,
    refkl_ptr,
    ent_ptr,
    n_rows,
    n_cols,
    s_stride,
    t_stride,
    r_stride,
    g_stride,
    inv_temp,
    beta,
    ref_coef,
    DIVERGENCE: tl.constexpr,
    HAS_REF: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    s_row = s_ptr + rows64[:, None] * s_stride
    t_row = t_ptr + rows64[:, None] * t_stride
    r_row = r_ptr + rows64[:, None] * r_stride
    lanes = tl.arange(0, BLOCK_V)
    zero = tl.zeros([BLOCK_ROWS], dtype=tl.float32)

    # Pass 1. Student at T (a) and teacher at T (b): running max m, sum of exp d; for the student
    # also sum e*(a - m) (entropy) and sum e*(a - b) (reverse KL); for the teacher sum e*(b - a).
    # With a reference: student at T=1 (p) and ref (q), plus sum e_p*(p - q).
    m_a = zero + NEG_BIG
    d_a = zero
    h_a = zero
    u_ab = zero
    m_b = zero + NEG_BIG
    d_b = zero
    u_ba = zero
    m_p = zero + NEG_BIG
    d_p = zero
    u_pq = zero
    m_q = zero + NEG_BIG
    d_q = zero
    for start in range(0, n_cols, BLOCK_V):
        cols = start + lanes
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        x = tl.load(s_row + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
        a = x * inv_temp
        b = tl.load(t_row + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32) * inv_temp
        m_new, d_new, rescale, e_a = online_logsumexp(m_a, d_a, a)
        h_a = rescale * (h_a + (m_a - m_new) * d_a) + weighted_sum(e_a, a - m_new[:, None])
        m_a = m_new
        d_a = d_new
        if DIVERGENCE == 0:
            u_ab = u_ab * rescale + weighted_sum(e_a, a - b)
        m_b, d_b, rescale_b, e_b = online_logsumexp(m_b, d_b, b)
        if DIVERGENCE == 1:
            u_ba = u_ba * rescale_b + weighted_sum(e_b, b - a)
        if HAS_REF:
            q = tl.load(r_row + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
            m_p, d_p, rescale_p, e_p = online_logsumexp(m_p, d_p, x)
            u_pq = u_pq * rescale_p + weighted_sum(e_p, x - q)
            m_q, d_q, _, _ = online_logsumexp(m_q, d_q, q)

    lse_a = m_a + tl.log(d_a)
    lse_b = m_b + tl.log(d_b)
    entropy = tl.log(d_a) - h_a / d_a
    log_1mb = tl.log(1.0 - beta)
    log_b = tl.log(beta)
    kl_sm = zero  # JSD: KL(s || m), also needed by its gradient
    if DIVERGENCE == 0:
        div = u_ab / d_a - lse_a + lse_b
    elif DIVERGENCE == 1:
        div = u_ba / d_b - lse_b + lse_a
    else:
        # Pass 2 (JSD): the mixture m = (1-beta) s + beta t needs normalised probabilities.
        kl_tm = zero
        for start in range(0, n_cols, BLOCK_V):
            cols = start + lanes
            ok = row_ok[:, None] & (cols < n_cols)[None, :]
            a = tl.load(s_row + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
            b = tl.load(t_row + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
            log_s = a * inv_temp - lse_a[:, None]
            log_t = b * inv_temp - lse_b[:, None]
            log_m = _log_mixture(log_s, log_t, log_1mb, log_b)
            kl_sm += weighted_sum(tl.exp(log_s), log_s - log_m)
            kl_tm += weighted_sum(tl.exp(log_t), log_t - log_m)
        div = beta * kl_tm + (1.0 - beta) * kl_sm

    ref_kl = zero
    lse_p = zero
    lse_q = zero
    if HAS_REF:
        lse_p = m_p + tl.log(d_p)
        lse_q = m_q + tl.log(d_q)
        ref_kl = u_pq / d_p - lse_p + lse_q
    tl.store(loss_ptr + rows64, div + ref_coef * ref_kl, mask=row_ok)
    tl.store(div_ptr + rows64, div, mask=row_ok)
    tl.store(refkl_ptr + rows64, ref_kl, mask=row_ok)
    tl.store(ent_ptr + rows64, entropy, mask=row_ok)

    if WRITE_GRAD:
        # Last pass: d loss_row / d student_logits, times the row coefficient. Rows whose
        # coefficient is 0 get exact zeros even if their logits made the loss NaN or inf.
        coef = tl.load(coef_ptr + rows64, mask=row_ok, other=0.0)
        g_row = g_ptr + rows64[:, None] * g_stride
        for start in range(0, n_cols, BLOCK_V):
            cols = start + lanes
            ok = row_ok[:, None] & (cols < n_cols)[None, :]
            x = tl.load(s_row + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
            b = tl.load(t_row + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
            log_s = x * inv_temp - lse_a[:, None]
            log_t = b * inv_temp - lse_b[:, None]
            s = tl.exp(log_s)
            if DIVERGENCE == 0:
                grad = tl.where(s > 0, s * (log_s - log_t - div[:, None]), 0.0)
            elif DIVERGENCE == 1:
                grad = s - tl.exp(log_t)
            else:
                log_m = _log_mixture(log_s, log_t, log_1mb, log_b)
                grad = tl.where(s > 0, (1.0 - beta) * s * (log_s - log_m - kl_sm[:, None]), 0.0)
            grad = grad * inv_temp
            if HAS_REF:
                q = tl.load(r_row + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
                log_p = x - lse_p[:, None]
                p = tl.exp(log_p)
                log_q = q - lse_q[:, None]
                grad += ref_coef * tl.where(p > 0, p * (log_p - log_q - ref_kl[:, None]), 0.0)
            grad = tl.where(coef[:, None] != 0, grad * coef[:, None], 0.0)
            tl.store(g_row + cols[None, :], grad.to(g_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _log_mixture(log_s, log_t, log_1mb, log_b):
    """log((1-beta) s + beta t) from log s and log t, stable; NaN only where s = t = 0."""
    x = log_s + log_1mb
    y = log_t + log_b
    hi = tl.maximum(x, y)
    return hi + tl.log(tl.exp(x - hi) + tl.exp(y - hi))


def distill_rows_triton(
    student: torch.Tensor,
    teacher: torch.Tensor,
    ref: torch.Tensor | None,
    coef: torch.Tensor | None,
    grad: torch.Tensor | None,
    settings: LossSettings,
    block_v: int | None = None,
) -> RowOutputs:
    """Per-row losses of (N, V) logits in one launch; writes coef-scaled gradients into `grad`.

    `grad` may be `student` itself (the fused-linear path overwrites its logits chunk in place).
    Rows must be contiguous in the vocabulary dimension.
    """
    n_rows, n_cols = student.shape
    outputs = RowOutputs.empty(n_rows, student.device)
    if n_rows == 0:
        return outputs
    block_rows, block_v, num_warps = pick_tiles(n_cols, block_v)
    write_grad = grad is not None
    ref_arg = ref if ref is not None else student
    grad_arg = grad if write_grad else student
    coef_arg = coef if write_grad else outputs.loss
    grid = (triton.cdiv(n_rows, block_rows),)
    _distill_kernel[grid](
        student,
        teacher,
        ref_arg,
        grad_arg,
        coef_arg,
        *outputs,
        n_rows,
        n_cols,
        student.stride(0),
        teacher.stride(0),
        ref_arg.stride(0),
        grad_arg.stride(0),
        1.0 / settings.temperature,
        float(settings.beta),
        float(settings.ref_coef),
        DIVERGENCE=_DIVERGENCE_IDS[settings.divergence],
        HAS_REF=ref is not None,
        WRITE_GRAD=write_grad,
        BLOCK_ROWS=block_rows,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return outputs


class DistillFunction(torch.autograd.Function):
    """Loss and gradient in one forward (either backend); backward only multiplies by grad_output."""

    @staticmethod
    def forward(ctx, student, teacher, ref, weights, settings: LossSettings, backend):
        grad = torch.empty_like(student) if ctx.needs_input_grad[0] else None
        coef = row_coefficients(weights, settings.reduction)
        rows = backend.distill_rows(student, teacher, ref, coef, grad, settings)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(rows.divergence, rows.ref_kl, rows.entropy)
        return (
            reduce_rows(rows.loss, weights, settings.reduction),
            rows.divergence,
            rows.ref_kl,
            rows.entropy,
        )

    @staticmethod
    def backward(ctx, grad_loss, *_stats_grads):
        (grad,) = ctx.saved_tensors
        return scale_grad(grad, grad_loss), None, None, None, None, None
