"""Row bookkeeping: (..., D) tensors as rows without copies, per-row outputs, weights,
reductions, chunks of rows, and the gradient scaling of the backward."""

from __future__ import annotations

from typing import NamedTuple

import torch


class RowOutputs(NamedTuple):
    """What a backend returns for N rows: unweighted per-row float32 values."""

    loss: torch.Tensor  # div_coef * divergence + ref_coef * ref_kl + ce_coef * cross_entropy
    divergence: torch.Tensor
    ref_kl: torch.Tensor  # zeros when there is no reference
    entropy: torch.Tensor
    cross_entropy: torch.Tensor  # zeros when it is not computed

    @classmethod
    def empty(cls, n_rows: int, device: torch.device) -> RowOutputs:
        return cls(*(torch.zeros(n_rows, device=device, dtype=torch.float32) for _ in cls._fields))


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View (..., D) as (outer, inner, D): row r is x[r // inner, r % inner], unit stride along D.

    Leading dimensions are merged where their strides allow, so any layout with at most two
    "jumps" between rows is read in place; `logits[:, :-1]` (TRL's shifted logits) is one. Other
    layouts, and a last dimension without unit stride, are copied.
    """
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        x = x.contiguous()
    groups: list[list[int]] = []  # [size, stride] of merged leading dimensions
    for size, stride in zip(x.shape[:-1], x.stride()[:-1], strict=True):
        if size == 1:
            continue
        if groups and groups[-1][1] == size * stride:
            groups[-1] = [groups[-1][0] * size, stride]
        else:
            groups.append([size, stride])
    if len(groups) > 2:
        return as_rows(x.contiguous())
    sizes = [g[0] for g in groups] + [1] * (2 - len(groups))
    return x.reshape(sizes[0], sizes[1], x.shape[-1])  # a view: the groups were merged by strides


def n_rows(rows: torch.Tensor) -> int:
    return rows.shape[0] * rows.shape[1]


def row_chunk(rows: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows lo..hi of an (outer, inner, D) view as (hi - lo, D): a view when they are equally
    spaced, else a copy of these rows only."""
    inner = rows.shape[1]
    if inner == 1:
        return rows[lo:hi, 0]
    pieces = []
    while lo < hi:
        outer, start = divmod(lo, inner)
        take = min(inner - start, hi - lo)
        pieces.append(rows[outer, start : start + take])
        lo += take
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def flat_rows(buffer: torch.Tensor) -> torch.Tensor:
    """(N, D) view of a contiguous (outer, inner, D) buffer (gradients are allocated that way)."""
    return buffer.view(-1, buffer.shape[-1])


def rows_per_chunk(n_cols: int, chunk_size: int | None, target_elements: int) -> int:
    """`chunk_size`, or as many rows of `n_cols` entries as fit `target_elements`."""
    return chunk_size if chunk_size is not None else max(1, target_elements // n_cols)


def top_ids(logits: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """(N, k) int64 ids of the k largest entries of each row of `logits` (outer, inner, V), ties
    broken by the lowest column, `chunk` rows at a time so that the temporaries stay bounded.

    The tie rule makes the rest of the vocabulary a threshold test, which the top-k kernel sums
    directly: an entry is outside when it is below the k-th largest value tau, or equal to tau
    at a column after the last id at tau. (torch.topk picks among ties arbitrarily.)
    """
    total = n_rows(logits)
    ids = torch.empty(total, k, device=logits.device, dtype=torch.int64)
    for lo in range(0, total, chunk):
        hi = min(lo + chunk, total)
        order = torch.sort(row_chunk(logits, lo, hi), dim=-1, descending=True, stable=True)
        ids[lo:hi] = order.indices[:, :k]
    return ids


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
    """grad *= grad_loss in place; grad_loss is a scalar, or one value per row of `grad`
    ((outer, inner, D) or (N, D) buffers, or a (D,) bias for a scalar).

    In place keeps peak memory at one gradient buffer. Because the buffer is a saved tensor,
    autograd's version check refuses a second backward through the same forward.
    """
    if grad is None:
        return None
    if grad_loss.dim():
        flat_rows(grad).mul_(grad_loss.reshape(-1, 1))
        return grad
    return grad.mul_(grad_loss)
