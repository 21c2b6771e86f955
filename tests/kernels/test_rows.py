"""Row bookkeeping: layouts, weights, reductions and the in-place gradient scaling."""

from __future__ import annotations

import torch

from vpd_kernels.rows import as_rows, reduce_rows, row_coefficients, rows_per_chunk, scale_grad


def test_as_rows_views_when_it_can():
    x = torch.randn(2, 3, 5)
    assert as_rows(x).data_ptr() == x.data_ptr() and as_rows(x).shape == (6, 5)
    transposed = torch.randn(5, 6).T  # unit stride along the tokens, not the vocabulary
    rows = as_rows(transposed)
    assert rows.stride(-1) == 1 and torch.equal(rows, transposed)


def test_reductions_and_their_coefficients():
    loss = torch.tensor([1.0, float("nan"), 3.0])
    weights = torch.tensor([1.0, 0.0, 3.0])
    assert reduce_rows(loss, weights, "sum") == 10.0
    assert reduce_rows(loss, weights, "mean") == 2.5
    assert torch.equal(reduce_rows(loss, weights, "none"), torch.tensor([1.0, 0.0, 9.0]))
    assert torch.equal(row_coefficients(weights, "mean"), weights / 4)
    zeros = torch.zeros(3)
    assert reduce_rows(loss, zeros, "mean") == 0.0
    assert torch.equal(row_coefficients(zeros, "mean"), zeros)


def test_scale_grad_by_scalar_or_per_row():
    grad = torch.ones(2, 3)
    assert torch.equal(scale_grad(grad, torch.tensor(2.0)), torch.full((2, 3), 2.0))
    per_row = scale_grad(torch.ones(2, 3), torch.tensor([1.0, -1.0]))
    assert torch.equal(per_row[1], -torch.ones(3))
    assert scale_grad(None, torch.tensor(1.0)) is None


def test_rows_per_chunk():
    assert rows_per_chunk(1000, None, 10_000) == 10
    assert rows_per_chunk(1000, 3, 10_000) == 3
    assert rows_per_chunk(10**6, None, 10) == 1
