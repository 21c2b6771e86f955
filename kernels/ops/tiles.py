"""Tile-size choice and the small jitted helpers that the Triton kernels share."""

from __future__ import annotations

from vpd_kernels.ops import tl, triton

# Finite stand-in for -inf as the initial running max: exp(x - NEG_BIG) stays 0 for x = -inf
# instead of the NaN that exp(-inf - -inf) would give, so all -inf rows and padding stay clean.
NEG_BIG = tl.constexpr(-1.0e30)

TILE_ELEMENTS = 4096  # elements of one (rows x vocab) tile


def pick_tiles(n_cols: int, block_v: int | None) -> tuple[int, int, int]:
    """Return (block_rows, block_v, num_warps) for rows of `n_cols` vocabulary entries.

    Long rows get one row per program and a vocab tile of TILE_ELEMENTS; short rows are packed
    several per program so that small vocabularies still fill a tile. `block_v` is a power of two
    (checked by checks.check_tuning) or None.
    """
    if block_v is None:
        block_v = min(triton.next_power_of_2(n_cols), TILE_ELEMENTS)
    block_rows = max(1, min(16, TILE_ELEMENTS // (2 * block_v)))
    num_warps = 8 if block_rows * block_v >= 4096 else 4
    return block_rows, block_v, num_warps


@triton.jit
def online_logsumexp(m, d, x):
    """One step of the running (max, sum of exp) pair over the tile `x` [rows, cols].

    Returns the new max, the new sum, the factor that rescales older sums, and exp(x - new max).
    """
    m_new = tl.maximum(m, tl.max(x, axis=1))
    rescale = tl.exp(m - m_new)
    e = tl.exp(x - m_new[:, None])
    return m_new, d * rescale + tl.sum(e, axis=1), rescale, e


@triton.jit
def weighted_sum(e, value):
    """Row sums of e * value, counting entries with weight e == 0 as 0 (the 0 * log 0 = 0 rule)."""
    return tl.sum(tl.where(e > 0, e * value, 0.0), axis=1)
