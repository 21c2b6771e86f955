"""Token log-probabilities under softmax(logits / T): the Triton kernels (forward and gradient)
and their launchers.

The forward reads each row once (running max and sum of exp((x - max) / T), plus one gathered
logit) and keeps only the per-row normaliser (max, log-sum), kept apart so that large logits lose
no precision; the backward reads the logits again and writes
grad_out * (onehot(token) - softmax(logits / T)) / T. The gradient cannot be produced in the
forward because it depends on the per-token grad_out, which is only known in backward.
torch_rows.token_logprobs states the same math in plain torch.
"""

from __future__ import annotations

import torch

from vpd_kernels.ops import tl, triton
from vpd_kernels.ops.tiles import NEG_BIG, max_step, pick_tiles, row_offsets
from vpd_kernels.rows import n_rows


@triton.jit
def _logprobs_fwd_kernel(
    x_ptr,
    tok_ptr,
    logp_ptr,
    norm_ptr,
    n_rows,
    n_cols,
    n_inner,
    x_so,
    x_si,
    inv_temp,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    x_row = x_ptr + row_offsets(rows64, n_inner, x_so, x_si)
    lanes = tl.arange(0, BLOCK_V)
    m = tl.zeros([BLOCK_ROWS], dtype=tl.float32) + NEG_BIG
    d = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + lanes
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        x = tl.load(x_row[:, None] + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
        m, shift = max_step(m, x)
        e = tl.exp((x - m[:, None]) * inv_temp)
        d = d * tl.exp(shift * inv_temp) + tl.sum(e, axis=1)
    log_sum = tl.log(d)
    tok = tl.load(tok_ptr + rows64, mask=row_ok, other=0)
    picked = tl.load(x_row + tok, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(logp_ptr + rows64, (picked - m) * inv_temp - log_sum, mask=row_ok)
    tl.store(norm_ptr + 2 * rows64, m, mask=row_ok)
    tl.store(norm_ptr + 2 * rows64 + 1, log_sum, mask=row_ok)


@triton.jit
def _logprobs_bwd_kernel(
    x_ptr,
    tok_ptr,
    norm_ptr,
    gout_ptr,
    g_ptr,
    n_rows,
    n_cols,
    n_inner,
    x_so,
    x_si,
    g_so,
    g_si,
    inv_temp,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    x_row = x_ptr + row_offsets(rows64, n_inner, x_so, x_si)
    g_row = g_ptr + row_offsets(rows64, n_inner, g_so, g_si)
    lanes = tl.arange(0, BLOCK_V)
    m = tl.load(norm_ptr + 2 * rows64, mask=row_ok, other=0.0)
    log_sum = tl.load(norm_ptr + 2 * rows64 + 1, mask=row_ok, other=0.0)
    scale = tl.load(gout_ptr + rows64, mask=row_ok, other=0.0).to(tl.float32) * inv_temp
    tok = tl.load(tok_ptr + rows64, mask=row_ok, other=-1).to(tl.int64)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + lanes
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        x = tl.load(x_row[:, None] + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
        onehot = tl.where(cols[None, :].to(tl.int64) == tok[:, None], 1.0, 0.0)
        probs = tl.exp((x - m[:, None]) * inv_temp - log_sum[:, None])
        grad = (onehot - probs) * scale[:, None]
        tl.store(g_row[:, None] + cols[None, :], grad.to(g_ptr.dtype.element_ty), mask=ok)


def token_logprobs_triton(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float, tile: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(token), normaliser (N, 2): max and log-sum) per row of (outer, inner, V) logits."""
    total = n_rows(logits)
    logp = torch.empty(total, device=logits.device, dtype=torch.float32)
    norm = torch.empty(total, 2, device=logits.device, dtype=torch.float32)
    if total == 0:
        return logp, norm
    block_rows, block_v, num_warps = pick_tiles(logits.shape[-1], tile)
    _logprobs_fwd_kernel[(triton.cdiv(total, block_rows),)](
        logits,
        tokens,
        logp,
        norm,
        total,
        logits.shape[-1],
        logits.shape[1],
        *logits.stride()[:2],
        1.0 / temperature,
        BLOCK_ROWS=block_rows,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return logp, norm


def token_logprobs_backward_triton(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    norm: torch.Tensor,
    grad_out: torch.Tensor,
    temperature: float,
    grad: torch.Tensor,
    tile: int | None = None,
) -> None:
    """Write grad_out * (onehot(token) - softmax(logits / T)) / T into `grad` (like `logits`)."""
    total = n_rows(logits)
    if total == 0:
        return
    block_rows, block_v, num_warps = pick_tiles(logits.shape[-1], tile)
    _logprobs_bwd_kernel[(triton.cdiv(total, block_rows),)](
        logits,
        tokens,
        norm,
        grad_out,
        grad,
        total,
        logits.shape[-1],
        logits.shape[1],
        *logits.stride()[:2],
        *grad.stride()[:2],
        1.0 / temperature,
        BLOCK_ROWS=block_rows,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
