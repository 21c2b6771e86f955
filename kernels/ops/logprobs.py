"""Token log-probabilities under softmax(logits / T): the Triton kernels (forward and gradient),
their launchers and the autograd Function.

The forward reads each row once (online log-sum-exp plus one gathered logit) and keeps only the
per-row log-sum-exp; the backward reads the logits again and writes
grad_out * (onehot(token) - softmax(logits / T)) / T. The gradient cannot be produced in the
forward because it depends on the per-token grad_out, which is only known in backward.
"""

from __future__ import annotations

import torch

from vpd_kernels.ops import tl, triton
from vpd_kernels.ops.tiles import NEG_BIG, online_logsumexp, pick_tiles


@triton.jit
def _logprobs_fwd_kernel(
    x_ptr,
    tok_ptr,
    logp_ptr,
    lse_ptr,
    n_rows,
    n_cols,
    x_stride,
    inv_temp,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    x_row = x_ptr + rows64[:, None] * x_stride
    lanes = tl.arange(0, BLOCK_V)
    m = tl.zeros([BLOCK_ROWS], dtype=tl.float32) + NEG_BIG
    d = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + lanes
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        a = tl.load(x_row + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32) * inv_temp
        m, d, _, _ = online_logsumexp(m, d, a)
    lse = m + tl.log(d)
    tok = tl.load(tok_ptr + rows64, mask=row_ok, other=0).to(tl.int64)
    picked = (
        tl.load(x_ptr + rows64 * x_stride + tok, mask=row_ok, other=0.0).to(tl.float32) * inv_temp
    )
    tl.store(logp_ptr + rows64, picked - lse, mask=row_ok)
    tl.store(lse_ptr + rows64, lse, mask=row_ok)


@triton.jit
def _logprobs_bwd_kernel(
    x_ptr,
    tok_ptr,
    lse_ptr,
    gout_ptr,
    g_ptr,
    n_rows,
    n_cols,
    x_stride,
    g_stride,
    inv_temp,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    x_row = x_ptr + rows64[:, None] * x_stride
    g_row = g_ptr + rows64[:, None] * g_stride
    lanes = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + rows64, mask=row_ok, other=0.0)
    scale = tl.load(gout_ptr + rows64, mask=row_ok, other=0.0).to(tl.float32) * inv_temp
    tok = tl.load(tok_ptr + rows64, mask=row_ok, other=-1).to(tl.int64)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + lanes
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        a = tl.load(x_row + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32) * inv_temp
        onehot = tl.where(cols[None, :].to(tl.int64) == tok[:, None], 1.0, 0.0)
        grad = (onehot - tl.exp(a - lse[:, None])) * scale[:, None]
        tl.store(g_row + cols[None, :], grad.to(g_ptr.dtype.element_ty), mask=ok)


def token_logprobs_triton(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float, block_v: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(token), log-sum-exp) per row of (N, V) logits at `temperature`, float32."""
    n_rows, n_cols = logits.shape
    logp = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    if n_rows == 0:
        return logp, lse
    block_rows, block_v, num_warps = pick_tiles(n_cols, block_v)
    _logprobs_fwd_kernel[(triton.cdiv(n_rows, block_rows),)](
        logits,
        tokens,
        logp,
        lse,
        n_rows,
        n_cols,
        logits.stride(0),
        1.0 / temperature,
        BLOCK_ROWS=block_rows,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return logp, lse


def token_logprobs_backward_triton(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    temperature: float,
    grad: torch.Tensor,
    block_v: int | None = None,
) -> None:
    """Write grad_out * (onehot(token) - softmax(logits / T)) / T into `grad` (N, V)."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    block_rows, block_v, num_warps = pick_tiles(n_cols, block_v)
    _logprobs_bwd_kernel[(triton.cdiv(n_rows, block_rows),)](
        logits,
        tokens,
        lse,
        grad_out,
        grad,
        n_rows,
        n_cols,
        logits.stride(0),
        grad.stride(0),
        1.0 / temperature,
        BLOCK_ROWS=block_rows,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )


class TokenLogprobsFunction(torch.autograd.Function):
    """Forward keeps only the per-row log-sum-exp; backward re-reads the logits (either backend)."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature: float, backend):
        logp, lse = backend.logprobs(logits, tokens, temperature)
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature, ctx.backend = temperature, backend
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        logits, tokens, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        ctx.backend.logprobs_backward(
            logits, tokens, lse, grad_logp.contiguous(), ctx.temperature, grad
        )
        return grad, None, None, None
