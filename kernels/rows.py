"""Row bookkeeping: (..., V) tensors as rows, per-row outputs, weights, reductions and chunks."""

from __future__ import annotations

from typing import NamedTuple

import torch


class RowOutputs(NamedTuple):
    """What a backend returns for a (N, V) block of rows: unweighted per-row float32 values."""

    loss: torch.Tensor  # divergence + ref_coef * ref_kl
    divergence: torch.Tensor
    ref_kl: torch.Tensor  # zeros when there is no reference
    entropy: torch.Tensor

    @classmethod
    def empty(cls, n_rows: int, device: torch.device) -> RowOutputs:
        return cls(*(torch.empty(n_rows, device=device, dtype=torch.float32) for _ in cls._fields))


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View (..., D) as (N, D) with unit stride along D, copying only when the layout needs it."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rows_per_chunk(n_cols: int, chunk_size: int | None, target_elements: int) -> int:
    """`chunk_size`, or as many rows of `n_cols` entries as fit `target_elements`."""
    return chunk_size if chunk_size is not None else max(1, target_elements // n_cols)


def _safe_total(weights: torch.Tensor) -> torch.Tensor:
    """sum(weights), or 1 when it is 0, so that an all-masked batch divides 0 by 1 (no NaN)."""
    total = weights.sum()
    return torch.where(total == 0, torch.ones_like(total), total)


def row_coefficients(weights: torch.Tensor, reduction: str) -> torch.Tensor:
    """d reduced_loss / d loss_row for each row: w / sum(w) for "mean", w otherwise."""
    return weights / _safe_total(weights) if reduction == "mean" else weights


def reduce_rows(loss_rows: torch.Tensor, weights: torch.Tensor, reduction: str) -> torch.Tensor:
    """Weight per-row losses and reduce; rows with weight 0 count as exactly 0 even if NaN."""
    weighted = torch.where(weights != 0, loss_rows * weights, 0.0)
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    return weighted.sum() / _safe_total(weights)


def scale_grad(grad: torch.Tensor | None, grad_loss: torch.Tensor) -> torch.Tensor | None:
    """grad *= grad_loss in place; grad_loss is a scalar, or one value per row of `grad`.

    In place keeps peak memory at one gradient buffer. Because the buffer is a saved tensor,
    autograd's version check refuses a second backward through the same forward.
    """
    if grad is None:
        return None
    scale = grad_loss.reshape(-1, *([1] * (grad.dim() - 1))) if grad_loss.dim() else grad_loss
    return grad.mul_(scale)
