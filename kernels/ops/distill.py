"""Distillation over the full vocabulary: the Triton kernel and its launcher.

One program owns a block of rows and walks the vocabulary in tiles:
- pass 1 keeps the running max of each distribution's raw logits apart from its sum of
  exponentials, and sums relative to the current max (entropy, the KL expectations, the ref KL);
  the label's logit for the cross-entropy is read after it;
- JSD only: pass 2 sums the mixture terms, which need the normalised probabilities;
- last pass (when a gradient is wanted) writes d loss_row / d student_logits, already multiplied by
  the row's coefficient (mask weight, / sum of weights for "mean"), in the student's dtype.
All arithmetic is float32 whatever the input dtype; logits enter as (x - max) / T, so the result
does not depend on the logits' offset. Offsets are int64 so N * V may exceed 2**31. Rows are
(outer, inner) pairs of strided views, so sliced inputs are read in place.
torch_rows.distill_rows states the same math in plain torch.
"""

from __future__ import annotations

import torch

from vpd_kernels.ops import tl, triton
from vpd_kernels.ops.tiles import (
    NEG_BIG,
    anchor_grad,
    entropy_step,
    log_mixture,
    max_step,
    pick_tiles,
    ref_step,
    rescaled,
    row_offsets,
    times,
    weighted_sum,
)
from vpd_kernels.rows import RowOutputs, n_rows
from vpd_kernels.settings import LossSettings

DIVERGENCE_IDS = {"reverse_kl": 0, "forward_kl": 1, "jsd": 2}


@triton.jit
def _distill_kernel(
    s_ptr,
    t_ptr,
    r_ptr,
    label_ptr,
    g_ptr,
    coef_ptr,
    loss_ptr,
    div_ptr,
    refkl_ptr,
    ent_ptr,
    ce_ptr,
    n_rows,
    n_cols,
    n_inner,
    s_so,
    s_si,
    t_so,
    t_si,
    r_so,
    r_si,
    g_so,
    g_si,
    inv_temp,
    beta,
    div_coef,
    ref_coef,
    ce_coef,
    DIVERGENCE: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_CE: tl.constexpr,
    NEED_P: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    s_row = s_ptr + row_offsets(rows64, n_inner, s_so, s_si)
    t_row = t_ptr + row_offsets(rows64, n_inner, t_so, t_si)
    r_row = r_ptr + row_offsets(rows64, n_inner, r_so, r_si)
    lanes = tl.arange(0, BLOCK_V)
    zero = tl.zeros([BLOCK_ROWS], dtype=tl.float32)

    # Pass 1. Student x and teacher y: running maxima m_s, m_t of the raw logits; at T, sums
    # d_a, d_b of exp((x - m_s) / T), exp((y - m_t) / T) (e_a, e_b), h_a = sum e_a alpha for the
    # entropy and the KL expectations u_ab = sum e_a (alpha - beta), u_ba = sum e_b (beta - alpha)
    # with alpha = (x - m_s) / T, beta = (y - m_t) / T. At T=1 (ref KL, cross-entropy): d_p, and
    # for the ref q: m_q, d_q and u_pq = sum e_p ((x - m_s) - (q - m_q)).
    m_s = zero + NEG_BIG
    d_a = zero
    h_a = zero
    m_t = zero + NEG_BIG
    d_b = zero
    u_ab = zero
    u_ba = zero
    d_p = zero
    m_q = zero + NEG_BIG
    d_q = zero
    u_pq = zero
    for start in range(0, n_cols, BLOCK_V):
        cols = start + lanes
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        x = tl.load(s_row[:, None] + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
        y = tl.load(t_row[:, None] + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
        m_s, shift_s = max_step(m_s, x)
        m_t, shift_t = max_step(m_t, y)
        x0 = x - m_s[:, None]
        alpha = x0 * inv_temp
        b = (y - m_t[:, None]) * inv_temp
        e_a = tl.exp(alpha)
        e_b = tl.exp(b)
        r_a = tl.exp(shift_s * inv_temp)
        r_b = tl.exp(shift_t * inv_temp)
        if DIVERGENCE == 0:
            u_ab = r_a * rescaled(u_ab, d_a, (shift_s - shift_t) * inv_temp) + weighted_sum(
                e_a, alpha - b
            )
        if DIVERGENCE == 1:
            u_ba = r_b * rescaled(u_ba, d_b, (shift_t - shift_s) * inv_temp) + weighted_sum(
                e_b, b - alpha
            )
        h_a = entropy_step(h_a, d_a, shift_s * inv_temp, alpha, e_a)
        d_a = d_a * r_a + tl.sum(e_a, axis=1)
        d_b = d_b * r_b + tl.sum(e_b, axis=1)
        if NEED_P:
            e_p = tl.exp(x0)
            if HAS_REF:
                q = tl.load(r_row[:, None] + cols[None, :], mask=ok, other=float("-inf"))
                m_q, d_q, u_pq = ref_step(x0, e_p, shift_s, q.to(tl.float32), d_p, m_q, d_q, u_pq)
            d_p = d_p * tl.exp(shift_s) + tl.sum(e_p, axis=1)

    lda = tl.log(d_a)
    ldb = tl.log(d_b)
    entropy = lda - h_a / d_a
    log_1mb = tl.log(1.0 - beta)
    log_b = tl.log(beta)
    kl_sm = zero  # JSD: KL(s || m), also needed by its gradient
    if DIVERGENCE == 0:
        div = u_ab / d_a - lda + ldb
    elif DIVERGENCE == 1:
        div = u_ba / d_b - ldb + lda
    else:
        # Pass 2 (JSD): the mixture m = (1-beta) s + beta t needs normalised probabilities.
        kl_tm = zero
        for start in range(0, n_cols, BLOCK_V):
            cols = start + lanes
            ok = row_ok[:, None] & (cols < n_cols)[None, :]
            x = tl.load(s_row[:, None] + cols[None, :], mask=ok, other=float("-inf"))
            y = tl.load(t_row[:, None] + cols[None, :], mask=ok, other=float("-inf"))
            log_s = (x.to(tl.float32) - m_s[:, None]) * inv_temp - lda[:, None]
            log_t = (y.to(tl.float32) - m_t[:, None]) * inv_temp - ldb[:, None]
            log_m = log_mixture(log_s, log_t, log_1mb, log_b)
            kl_sm += weighted_sum(tl.exp(log_s), log_s - log_m)
            kl_tm += weighted_sum(tl.exp(log_t), log_t - log_m)
        div = beta * kl_tm + (1.0 - beta) * kl_sm

    ldp = tl.log(d_p)
    ldq = tl.log(d_q)
    ref_kl = zero
    if HAS_REF:
        ref_kl = u_pq / d_p - ldp + ldq
    ce = zero
    label = rows64 * 0
    if HAS_CE:
        label = tl.load(label_ptr + rows64, mask=row_ok, other=0)
        x_label = tl.load(s_row + label, mask=row_ok, other=0.0).to(tl.float32)
        ce = ldp - (x_label - m_s)
    loss = times(div_coef, div) + times(ref_coef, ref_kl) + times(ce_coef, ce)
    tl.store(loss_ptr + rows64, loss, mask=row_ok)
    tl.store(div_ptr + rows64, div, mask=row_ok)
    tl.store(refkl_ptr + rows64, ref_kl, mask=row_ok)
    tl.store(ent_ptr + rows64, entropy, mask=row_ok)
    tl.store(ce_ptr + rows64, ce, mask=row_ok)

    if WRITE_GRAD:
        # Last pass: d loss_row / d student_logits, times the row coefficient. Rows whose
        # coefficient is 0 get exact zeros even if their logits made the loss NaN or inf. The
        # gradient may overwrite the student logits (fused-linear): the barrier keeps the label's
        # logit, read above by some thread, from being overwritten first by another.
        tl.debug_barrier()
        coef = tl.load(coef_ptr + rows64, mask=row_ok, other=0.0)
        g_row = g_ptr + row_offsets(rows64, n_inner, g_so, g_si)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + lanes
            ok = row_ok[:, None] & (cols < n_cols)[None, :]
            x = tl.load(s_row[:, None] + cols[None, :], mask=ok, other=float("-inf"))
            y = tl.load(t_row[:, None] + cols[None, :], mask=ok, other=float("-inf"))
            x0 = x.to(tl.float32) - m_s[:, None]
            log_s = x0 * inv_temp - lda[:, None]
            log_t = (y.to(tl.float32) - m_t[:, None]) * inv_temp - ldb[:, None]
            s = tl.exp(log_s)
            if DIVERGENCE == 0:
                grad = tl.where(s > 0, s * (log_s - log_t - div[:, None]), 0.0)
            elif DIVERGENCE == 1:
                grad = s - tl.exp(log_t)
            else:
                log_m = log_mixture(log_s, log_t, log_1mb, log_b)
                grad = tl.where(s > 0, (1.0 - beta) * s * (log_s - log_m - kl_sm[:, None]), 0.0)
            grad = times(div_coef * inv_temp, grad)
            if NEED_P:
                q = x0
                if HAS_REF:
                    q = tl.load(r_row[:, None] + cols[None, :], mask=ok, other=float("-inf"))
                    q = q.to(tl.float32)
                grad += anchor_grad(
                    x0,
                    q,
                    cols[None, :],
                    label,
                    ldp,
                    m_q,
                    ldq,
                    ref_kl,
                    ref_coef,
                    ce_coef,
                    HAS_REF,
                    HAS_CE,
                )
            grad = tl.where(coef[:, None] != 0, grad * coef[:, None], 0.0)
            tl.store(g_row[:, None] + cols[None, :], grad.to(g_ptr.dtype.element_ty), mask=ok)


def distill_rows_triton(
    student: torch.Tensor,
    teacher: torch.Tensor,
    ref: torch.Tensor | None,
    labels: torch.Tensor | None,
    coef: torch.Tensor | None,
    grad: torch.Tensor | None,
    settings: LossSettings,
    tile: int | None = None,
) -> RowOutputs:
    """Per-row outputs of (outer, inner, V) row views in one launch; writes coef-scaled gradients
    into `grad` (same layout; it may be `student` itself). The cross-entropy is computed when
    `labels` (N,) are given."""
    total = n_rows(student)
    outputs = RowOutputs.empty(total, student.device)
    if total == 0:
        return outputs
    block_rows, block_v, num_warps = pick_tiles(student.shape[-1], tile)
    ref_arg = ref if ref is not None else student  # absent inputs are never read
    grad_arg = grad if grad is not None else student
    _distill_kernel[(triton.cdiv(total, block_rows),)](
        student,
        teacher,
        ref_arg,
        labels if labels is not None else outputs.loss,
        grad_arg,
        coef if grad is not None else outputs.loss,
        *outputs,
        total,
        student.shape[-1],
        student.shape[1],
        *student.stride()[:2],
        *teacher.stride()[:2],
        *ref_arg.stride()[:2],
        *grad_arg.stride()[:2],
        1.0 / settings.temperature,
        float(settings.beta),
        float(settings.div_coef),
        float(settings.ref_coef),
        float(settings.ce_coef),
        DIVERGENCE=DIVERGENCE_IDS[settings.divergence],
        HAS_REF=ref is not None,
        HAS_CE=labels is not None,
        NEED_P=ref is not None or labels is not None,
        WRITE_GRAD=grad is not None,
        BLOCK_ROWS=block_rows,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return outputs
