"""Tile-size choice and the small jitted helpers that the Triton kernels share.

Precision at any logit scale: every running max is kept in raw logit units and apart from its
log-sum, and logits enter the exponentials as (x - max) / T, which is exact near the max whatever
the offset of the logits. Sums that depend on the max (entropy, KL) are kept relative to the
current max and shifted when it moves, so no large numbers cancel at the end.
"""

from __future__ import annotations

from vpd_kernels.ops import tl, triton

# Finite stand-in for -inf as the initial running max: exp(x - NEG_BIG) stays 0 for x = -inf
# instead of the NaN that exp(-inf - -inf) would give, so all -inf rows and padding stay clean.
NEG_BIG = tl.constexpr(-1.0e30)

TILE_ELEMENTS = 4096  # elements of one (rows x vocab) tile


def pick_tiles(
    n_cols: int, block_v: int | None, tile_elements: int = TILE_ELEMENTS
) -> tuple[int, int, int]:
    """Return (block_rows, block_v, num_warps) for rows of `n_cols` vocabulary entries.

    Long rows get one row per program and a vocab tile of `tile_elements`; short rows are packed
    several per program so that small vocabularies still fill a tile. `block_v` is a power of two
    (checked by checks.check_tuning) or None. tests/kernels/test_compile.py checks that the
    kernels compile for sm_90 without register spills at these sizes.
    """
    if block_v is None:
        block_v = min(triton.next_power_of_2(n_cols), tile_elements)
    block_rows = max(1, min(16, tile_elements // (2 * block_v)))
    num_warps = 8 if block_rows * block_v >= tile_elements else 4
    return block_rows, block_v, num_warps


@triton.jit
def row_offsets(rows64, n_inner, stride_outer, stride_inner):
    """Element offset of each row r = (outer, inner) of an (outer, n_inner, V) strided view."""
    outer = rows64 // n_inner
    return outer * stride_outer + (rows64 - outer * n_inner) * stride_inner


@triton.jit
def weighted_sum(e, value):
    """Row sums of e * value, counting entries with weight e == 0 as 0 (the 0 * log 0 = 0 rule)."""
    return tl.sum(tl.where(e > 0, e * value, 0.0), axis=1)


@triton.jit
def rescaled(u, d, delta):
    """u + d * delta where the sum d is > 0; u where d == 0 (an empty sum stays 0 under a shift).

    Moves a running sum of e * v to a new max: when the max moves, each v changes by delta.
    """
    return tl.where(d > 0, u + d * delta, u)


@triton.jit
def times(coef, value):
    """coef * value, exactly 0 when the scalar coef is 0 (even where value is inf or NaN)."""
    return tl.where(coef != 0, coef * value, 0.0)


@triton.jit
def max_step(m, x):
    """The running max of raw logits after the tile x, and its shift old - new (<= 0)."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    return m_new, m - m_new


@triton.jit
def max_rest_step(m, rest, arg, x, cols, scale):
    """One tile of a running max of raw logits with rest = sum over all entries but one maximum
    of exp((x - max) * scale), so that the sum is 1 + rest with `rest` never rounded against the
    1 (top-k tails need it when one token has almost all the mass), and that maximum's column.

    Start from m = NEG_BIG, rest = -1 (an empty sum), arg int64. Also returns the shift old - new max and
    e = exp((x - new max) * scale) on the tile.
    """
    tile_max = tl.max(x, axis=1)
    moved = tile_max > m
    m_new = tl.maximum(m, tile_max)
    r = tl.exp((m - m_new) * scale)
    e = tl.exp((x - m_new[:, None]) * scale)
    col_max = tl.min(tl.where(x == tile_max[:, None], cols[None, :], 2147483647), axis=1)
    others = tl.sum(tl.where(cols[None, :] == col_max[:, None], 0.0, e), axis=1)
    rest = tl.where(moved, rest * r + r + others, rest + tl.sum(e, axis=1))
    return m_new, rest, tl.where(moved, col_max.to(tl.int64), arg), m - m_new, e


@triton.jit
def entropy_step(h, d, shift, alpha, e):
    """Running sum of e * alpha (alpha = (x - max) / T) for the entropy, moved by `shift` / T.

    `d` is the sum of exp(alpha) before this tile; `e` = exp(alpha) on the tile.
    """
    return tl.exp(shift) * rescaled(h, d, shift) + weighted_sum(e, alpha)


@triton.jit
def ref_step(x0, e_p, shift, q, d_p, m_q, d_q, u_pq):
    """One tile of KL(softmax(x) || softmax(q)) at T = 1.

    x0 = x - max of the student (after this tile), e_p = exp(x0), shift = the student's max shift,
    d_p its T=1 sum before this tile. Returns the ref's max and sum, and sum e_p * (x0 - q0).
    """
    m_q_new, shift_q = max_step(m_q, q)
    q0 = q - m_q_new[:, None]
    u_pq = tl.exp(shift) * rescaled(u_pq, d_p, shift - shift_q) + weighted_sum(e_p, x0 - q0)
    return m_q_new, d_q * tl.exp(shift_q) + tl.sum(tl.exp(q0), axis=1), u_pq


@triton.jit
def anchor_grad(x0, q, cols, label, ldp, m_q, ldq, ref_kl, ref_coef, ce_coef, HAS_REF, HAS_CE):
    """d/dx of ref_coef * KL(p || softmax(q)) + ce_coef * CE(label), p = softmax(x) at T = 1.

    x0 = x - max; ldp, ldq: log-sums of the student and the ref; cols: the ids of the entries.
    """
    log_p = x0 - ldp[:, None]
    p = tl.exp(log_p)
    grad = tl.zeros_like(p)
    if HAS_REF:
        log_q = (q - m_q[:, None]) - ldq[:, None]
        grad += times(ref_coef, tl.where(p > 0, p * (log_p - log_q - ref_kl[:, None]), 0.0))
    if HAS_CE:
        grad += times(ce_coef, p - tl.where(cols == label[:, None], 1.0, 0.0))
    return grad


@triton.jit
def log_mixture(log_s, log_t, log_1mb, log_b):
    """log((1-beta) s + beta t) from log s and log t, stable; NaN only where s = t = 0."""
    x = log_s + log_1mb
    y = log_t + log_b
    hi = tl.maximum(x, y)
    return hi + tl.log(tl.exp(x - hi) + tl.exp(y - hi))
