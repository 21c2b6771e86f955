"""Distillation from the teacher's top-k tokens: the Triton kernel and its launcher.

The teacher is k ids per token with their log-probabilities, given (an inference server's
top-k) or taken from the teacher's logits, which the kernel then normalises over the full
vocabulary itself. The student is the full-vocabulary log-softmax at T. The divergence is taken
over k + 1 buckets (the k tokens and, with `tail`, one bucket for the rest of each
distribution: 1 - the sum of its top-k probabilities) or, without the tail, over the k tokens
renormalised. One program owns a block of rows:
- pass 1 over the vocabulary: running max and log-sum of the student (at T and at T = 1), of the
  teacher's logits when given, and the ref KL (as in ops/distill.py). Tails are kept accurate
  when tiny (a confident student, a peaked teacher): with the teacher's logits both are summed
  directly over the entries outside the ids (a threshold test on the ranking logits, the
  teacher's or the student's, see rows.top_ids); with given log-probs the student's sum leaves
  its max out (1 + rest), and the teacher's rest is 1 - its top-k mass in float64 (all that
  given log-probs say about it);
- the k buckets: gather the student's (and teacher's) logits at the ids, the divergence D and
  u_b = P_b dD/dP_b per bucket;
- last pass (gradient): with the tail, every entry j outside the ids gets
  s_j (dD/dP_tail - sum_b u_b) (it only moves the tail bucket), plus the ref / cross-entropy terms;
  the k entries at the ids get u_k - P_k sum_b u_b (plus the same terms), written to a (N, k)
  buffer that the launcher scatters over the gradient afterwards.
torch_rows.topk_rows states the same math in plain torch.
"""

from __future__ import annotations

import torch

from vpd_kernels.ops import tl, triton
from vpd_kernels.ops.distill import DIVERGENCE_IDS
from vpd_kernels.ops.tiles import (
    NEG_BIG,
    anchor_grad,
    entropy_step,
    log_mixture,
    max_rest_step,
    max_step,
    pick_tiles,
    ref_step,
    row_offsets,
    times,
    weighted_sum,
)
from vpd_kernels.rows import RowOutputs, flat_rows, n_rows
from vpd_kernels.settings import LossSettings

TILE_ELEMENTS = 2048  # half of ops/tiles.py's: this kernel holds more per element (no spills)


@triton.jit
def _logsumexp_k(v):
    """log sum exp over the k lanes of each row (masked lanes are -inf)."""
    m = tl.maximum(tl.max(v, axis=1), NEG_BIG)
    return m + tl.log(tl.sum(tl.exp(v - m[:, None]), axis=1))


@triton.jit
def _rest_of_full(rest, arg, ids, e_k, log_k, k_ok):
    """1 - the top-k mass of the student with given ids: (rest - the top-k terms but the max)
    / (1 + rest) when its max `arg` is among the ids, which stays accurate when the max holds
    almost all the mass; else 1 - sum exp(log_k). Never below 0."""
    has_max = tl.sum(tl.where(k_ok & (ids == arg[:, None]), 1, 0), axis=1) > 0
    others = tl.sum(tl.where(k_ok & (ids != arg[:, None]), e_k, 0.0), axis=1)
    rest_k = tl.where(has_max, (rest - others) / (1.0 + rest), 1.0 - tl.sum(tl.exp(log_k), axis=1))
    return tl.maximum(rest_k, 0.0)


@triton.jit
def _topk_kernel(
    s_ptr,
    t_ptr,
    tlp_ptr,
    ids_ptr,
    r_ptr,
    label_ptr,
    g_ptr,
    gk_ptr,
    coef_ptr,
    loss_ptr,
    div_ptr,
    refkl_ptr,
    ent_ptr,
    ce_ptr,
    n_rows,
    n_cols,
    n_k,
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
    TAIL: tl.constexpr,
    TEACHER_LOGITS: tl.constexpr,
    RANK_STUDENT: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_CE: tl.constexpr,
    NEED_P: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    s_row = s_ptr + row_offsets(rows64, n_inner, s_so, s_si)
    t_row = t_ptr + row_offsets(rows64, n_inner, t_so, t_si)
    r_row = r_ptr + row_offsets(rows64, n_inner, r_so, r_si)
    lanes = tl.arange(0, BLOCK_V)
    zero = tl.zeros([BLOCK_ROWS], dtype=tl.float32)

    # The ids, and with the teacher's logits the k-th largest ranking logit tau (the teacher's,
    # or the student's with RANK_STUDENT) and the last column at tau among the ids, c_tau: the
    # ids are the top k with ties broken by the lowest column (rows.top_ids), so an entry is
    # outside them exactly when its ranking logit is below tau, or at tau after column c_tau.
    kk = tl.arange(0, BLOCK_K)
    k_ok = row_ok[:, None] & (kk < n_k)[None, :]
    k_offs = rows64[:, None] * n_k + kk[None, :]
    ids = tl.load(ids_ptr + k_offs, mask=k_ok, other=0)
    tau = zero
    c_tau = rows64 * 0
    if TEACHER_LOGITS:
        yk = tl.load(t_row[:, None] + ids, mask=k_ok, other=float("-inf")).to(tl.float32)
        rk = yk
        if RANK_STUDENT:
            rk = tl.load(s_row[:, None] + ids, mask=k_ok, other=float("-inf")).to(tl.float32)
        tau = tl.min(tl.where(k_ok, rk, float("inf")), axis=1)
        c_tau = tl.max(tl.where(k_ok & (rk == tau[:, None]), ids, -1), axis=1)

    # Pass 1: the normalisers (see ops/distill.py for the names). The student's sum at T leaves
    # one maximal entry out (1 + rest_a). With the teacher's logits, both tails are summed
    # directly over the entries outside the ids (tail_a, tail_b), never as 1 - the top-k mass,
    # so that they keep float32's relative accuracy however small they are.
    m_s = zero + NEG_BIG
    rest_a = zero - 1.0  # sum of exp((x - m_s) / T) is 1 + rest_a (see max_rest_step)
    arg_s = rows64 * 0
    h_a = zero
    m_t = zero + NEG_BIG
    d_b = zero
    tail_a = zero
    tail_b = zero
    d_p = zero
    m_q = zero + NEG_BIG
    d_q = zero
    u_pq = zero
    for start in range(0, n_cols, BLOCK_V):
        cols = start + lanes
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        x = tl.load(s_row[:, None] + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
        d_a = 1.0 + rest_a
        m_s, rest_a, arg_s, shift_s, e_a = max_rest_step(m_s, rest_a, arg_s, x, cols, inv_temp)
        x0 = x - m_s[:, None]
        h_a = entropy_step(h_a, d_a, shift_s * inv_temp, x0 * inv_temp, e_a)
        if TEACHER_LOGITS:
            y = tl.load(t_row[:, None] + cols[None, :], mask=ok, other=float("-inf"))
            y = y.to(tl.float32)
            m_t, shift_t = max_step(m_t, y)
            e_b = tl.exp((y - m_t[:, None]) * inv_temp)
            r_b = tl.exp(shift_t * inv_temp)
            d_b = d_b * r_b + tl.sum(e_b, axis=1)
            if TAIL:
                r_a = tl.exp(shift_s * inv_temp)
                rank = x if RANK_STUDENT else y
                later = cols[None, :].to(tl.int64) > c_tau[:, None]
                outside = ok & ((rank < tau[:, None]) | ((rank == tau[:, None]) & later))
                tail_a = tail_a * r_a + tl.sum(tl.where(outside, e_a, 0.0), axis=1)
                tail_b = tail_b * r_b + tl.sum(tl.where(outside, e_b, 0.0), axis=1)
        if NEED_P:
            e_p = tl.exp(x0)
            if HAS_REF:
                q = tl.load(r_row[:, None] + cols[None, :], mask=ok, other=float("-inf"))
                m_q, d_q, u_pq = ref_step(x0, e_p, shift_s, q.to(tl.float32), d_p, m_q, d_q, u_pq)
            d_p = d_p * tl.exp(shift_s) + tl.sum(e_p, axis=1)
    d_a = 1.0 + rest_a
    lda = tl.log(d_a)
    entropy = lda - h_a / d_a
    ldp = tl.log(d_p)
    ldq = tl.log(d_q)
    ref_kl = zero
    if HAS_REF:
        ref_kl = u_pq / d_p - ldp + ldq

    # The k buckets (and the tail): log-probabilities log_P (student) and log_Q (teacher).
    xk0 = tl.load(s_row[:, None] + ids, mask=k_ok, other=float("-inf")).to(tl.float32)
    xk0 = xk0 - m_s[:, None]
    e_sk = tl.exp(xk0 * inv_temp)
    log_sk = xk0 * inv_temp - lda[:, None]
    if TEACHER_LOGITS:
        log_tk = (yk - m_t[:, None]) * inv_temp - tl.log(d_b)[:, None]
    else:
        log_tk = tl.load(tlp_ptr + k_offs, mask=k_ok, other=float("-inf"))
    qk = xk0  # the ref's logits at the ids (read only with a ref)
    if HAS_REF:
        qk = tl.load(r_row[:, None] + ids, mask=k_ok, other=float("-inf")).to(tl.float32)
    label = rows64 * 0
    ce = zero
    if HAS_CE:
        label = tl.load(label_ptr + rows64, mask=row_ok, other=0)
        x_label = tl.load(s_row + label, mask=row_ok, other=0.0).to(tl.float32)
        ce = ldp - (x_label - m_s)
    if TAIL:
        log_P = log_sk
        log_Q = log_tk
        if TEACHER_LOGITS:
            P_t = tail_a / d_a
            Q_t = tail_b / d_b
        else:
            P_t = _rest_of_full(rest_a, arg_s, ids, e_sk, log_sk, k_ok)
            # Given log-probs determine the teacher's rest only as 1 - their sum: in float64.
            mass = tl.sum(tl.where(k_ok, tl.exp(log_tk.to(tl.float64)), 0.0), axis=1)
            Q_t = tl.maximum(1.0 - mass, 0.0).to(tl.float32)
        log_Pt = tl.log(P_t)
        log_Qt = tl.log(Q_t)
    else:
        log_P = log_sk - _logsumexp_k(log_sk)[:, None]
        log_Q = log_tk - _logsumexp_k(log_tk)[:, None]
    P = tl.exp(log_P)
    Q = tl.exp(log_Q)
    log_1mb = tl.log(1.0 - beta)
    log_b = tl.log(beta)
    # D over the k buckets, and u_b = P_b dD/dP_b (up to a constant per row, which cancels).
    if DIVERGENCE == 0:
        div = weighted_sum(P, log_P - log_Q)
        u = tl.where(P > 0, P * (log_P - log_Q), 0.0)
    elif DIVERGENCE == 1:
        div = weighted_sum(Q, log_Q - log_P)
        u = -Q
    else:
        log_M = log_mixture(log_P, log_Q, log_1mb, log_b)
        div = beta * weighted_sum(Q, log_Q - log_M) + (1.0 - beta) * weighted_sum(P, log_P - log_M)
        u = tl.where(P > 0, (1.0 - beta) * P * (log_P - log_M), 0.0)
    u_all = tl.sum(u, axis=1)
    dense = zero  # with the tail: the gradient factor of the entries outside the ids
    if TAIL:
        # dD/dP_tail (0 where the tail is empty: its terms vanish with it) and the tail's terms.
        if DIVERGENCE == 0:
            d_tail = tl.where(P_t > 0, log_Pt - log_Qt, 0.0)
            div += tl.where(P_t > 0, P_t * d_tail, 0.0)
        elif DIVERGENCE == 1:
            d_tail = tl.where(P_t > 0, -Q_t / P_t, 0.0)
            div += tl.where(Q_t > 0, Q_t * (log_Qt - log_Pt), 0.0)
        else:
            log_Mt = log_mixture(log_Pt, log_Qt, log_1mb, log_b)
            d_tail = tl.where(P_t > 0, (1.0 - beta) * (log_Pt - log_Mt), 0.0)
            div += beta * tl.where(Q_t > 0, Q_t * (log_Qt - log_Mt), 0.0)
            div += (1.0 - beta) * tl.where(P_t > 0, P_t * (log_Pt - log_Mt), 0.0)
        # d_tail - u_all with u_all += P_t d_tail, written without cancelling d_tail against
        # P_t d_tail when the tail holds almost all the mass: (1 - P_t) d_tail - sum_k u_k.
        dense = tl.sum(P, axis=1) * d_tail - u_all
        u_all += P_t * d_tail
    loss = times(div_coef, div) + times(ref_coef, ref_kl) + times(ce_coef, ce)
    tl.store(loss_ptr + rows64, loss, mask=row_ok)
    tl.store(div_ptr + rows64, div, mask=row_ok)
    tl.store(refkl_ptr + rows64, ref_kl, mask=row_ok)
    tl.store(ent_ptr + rows64, entropy, mask=row_ok)
    tl.store(ce_ptr + rows64, ce, mask=row_ok)

    if WRITE_GRAD:
        coef = tl.load(coef_ptr + rows64, mask=row_ok, other=0.0)
        # The k entries: their whole gradient, scattered over the dense one by the launcher.
        grad_k = times(div_coef * inv_temp, u - P * u_all[:, None])
        if NEED_P:
            grad_k += anchor_grad(
                xk0, qk, ids, label, ldp, m_q, ldq, ref_kl, ref_coef, ce_coef, HAS_REF, HAS_CE
            )
        grad_k = tl.where(coef[:, None] != 0, grad_k * coef[:, None], 0.0)
        tl.store(gk_ptr + k_offs, grad_k, mask=k_ok)
        # The gradient may overwrite the student logits (fused-linear): the barrier keeps the
        # gathered logits, read above by some threads, from being overwritten first by others.
        tl.debug_barrier()
        g_row = g_ptr + row_offsets(rows64, n_inner, g_so, g_si)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + lanes
            ok = row_ok[:, None] & (cols < n_cols)[None, :]
            x = tl.load(s_row[:, None] + cols[None, :], mask=ok, other=float("-inf"))
            x0 = x.to(tl.float32) - m_s[:, None]
            grad = tl.zeros([BLOCK_ROWS, BLOCK_V], dtype=tl.float32)
            if TAIL:
                s = tl.exp(x0 * inv_temp - lda[:, None])
                grad = times(div_coef * inv_temp, s * dense[:, None])
            if NEED_P:
                q = x0
                if HAS_REF:
                    q = tl.load(r_row[:, None] + cols[None, :], mask=ok, other=float("-inf"))
                    q = q.to(tl.float32)
                grad += anchor_grad(
                    x0, q, cols[None, :], label, ldp, m_q, ldq, ref_kl, ref_coef, ce_coef,
                    HAS_REF, HAS_CE,
                )  # fmt: skip
            grad = tl.where(coef[:, None] != 0, grad * coef[:, None], 0.0)
            tl.store(g_row[:, None] + cols[None, :], grad.to(g_ptr.dtype.element_ty), mask=ok)


def topk_rows_triton(
    student: torch.Tensor,
    ids: torch.Tensor,
    teacher_logprobs: torch.Tensor | None,
    teacher: torch.Tensor | None,
    ref: torch.Tensor | None,
    labels: torch.Tensor | None,
    coef: torch.Tensor | None,
    grad: torch.Tensor | None,
    settings: LossSettings,
    tile: int | None = None,
) -> RowOutputs:
    """Per-row outputs of (outer, inner, V) student rows against the teacher's top-k: `ids`
    (N, k) int64 with either `teacher_logprobs` (N, k) float32 or the teacher's logits `teacher`
    (outer, inner, V). Writes coef-scaled gradients into `grad` (it may be `student` itself)."""
    total = n_rows(student)
    outputs = RowOutputs.empty(total, student.device)
    if total == 0:
        return outputs
    n_k = ids.shape[1]
    block_rows, block_v, num_warps = pick_tiles(student.shape[-1], tile, TILE_ELEMENTS)
    grad_k = (
        torch.empty(ids.shape, device=student.device, dtype=torch.float32)
        if grad is not None
        else None
    )
    teacher_arg = teacher if teacher is not None else student  # absent inputs are never read
    ref_arg = ref if ref is not None else student
    grad_arg = grad if grad is not None else student
    _topk_kernel[(triton.cdiv(total, block_rows),)](
        student,
        teacher_arg,
        teacher_logprobs if teacher_logprobs is not None else outputs.loss,
        ids,
        ref_arg,
        labels if labels is not None else outputs.loss,
        grad_arg,
        grad_k if grad is not None else outputs.loss,
        coef if grad is not None else outputs.loss,
        *outputs,
        total,
        student.shape[-1],
        n_k,
        student.shape[1],
        *student.stride()[:2],
        *teacher_arg.stride()[:2],
        *ref_arg.stride()[:2],
        *grad_arg.stride()[:2],
        1.0 / settings.temperature,
        float(settings.beta),
        float(settings.div_coef),
        float(settings.ref_coef),
        float(settings.ce_coef),
        DIVERGENCE=DIVERGENCE_IDS[settings.divergence],
        TAIL=settings.tail,
        TEACHER_LOGITS=teacher is not None,
        RANK_STUDENT=teacher is not None and settings.topk_from == "student",
        HAS_REF=ref is not None,
        HAS_CE=labels is not None,
        NEED_P=ref is not None or labels is not None,
        WRITE_GRAD=grad is not None,
        BLOCK_ROWS=block_rows,
        BLOCK_V=block_v,
        BLOCK_K=triton.next_power_of_2(n_k),
        num_warps=num_warps,
    )
    if grad is not None:
        flat_rows(grad).scatter_(1, ids, grad_k.to(grad.dtype))
    return outputs
