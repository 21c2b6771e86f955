"""Row bookkeeping: layouts read in place, chunks, weights, reductions, gradient scaling."""

from __future__ import annotations

import torch

from vpd_kernels.rows import (
    as_rows,
    n_rows,
    reduce_rows,
    row_chunk,
    row_coefficients,
    rows_per_chunk,
    scale_grad,
    top_ids,
)


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_layouts_read_in_place_or_copied():
    x = torch.randn(2, 3, 5)
    assert as_rows(x).shape == (6, 1, 5) and shares_memory(as_rows(x), x)
    shifted = torch.randn(2, 4, 5)[:, :-1]  # TRL's logits[:, :-1]: two strides between rows
    rows = as_rows(shifted)
    assert rows.shape == (2, 3, 5) and shares_memory(rows, shifted)
    assert as_rows(torch.randn(4, 1, 3, 5)[:, :, 1:]).shape == (4, 2, 5)  # size-1 dims vanish
    three_jumps = torch.randn(2, 3, 4, 5)[:, :-1, :-1]
    assert not shares_memory(as_rows(three_jumps), three_jumps)
    transposed = torch.randn(5, 6).T  # unit stride along the tokens, not the vocabulary
    rows = as_rows(transposed)
    assert rows.stride(-1) == 1 and torch.equal(rows[:, 0], transposed)


def test_row_chunks_across_the_outer_dimension():
    x = torch.arange(2 * 4 * 3.0).view(2, 4, 3)[:, 1:]  # rows: x[0, 1..3], x[1, 1..3]
    rows = as_rows(x)
    flat = x.reshape(-1, 3)
    assert n_rows(rows) == 6
    for lo, hi in [(0, 6), (0, 2), (2, 5), (3, 6), (5, 6)]:
        assert torch.equal(row_chunk(rows, lo, hi), flat[lo:hi])
    assert shares_memory(row_chunk(rows, 0, 3), x)  # inside one outer index: a view


def test_top_ids_in_chunks():
    teacher = as_rows(torch.randn(3, 4, 10)[:, 1:])
    ids = top_ids(teacher, 3, chunk=4)
    expected = torch.topk(teacher.reshape(-1, 10), 3).indices
    assert torch.equal(ids.sort(-1).values, expected.sort(-1).values)


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
    grad = torch.ones(2, 1, 3)
    assert torch.equal(scale_grad(grad, torch.tensor(2.0)), torch.full((2, 1, 3), 2.0))
    per_row = scale_grad(torch.ones(2, 1, 3), torch.tensor([1.0, -1.0]))
    assert torch.equal(per_row[1, 0], -torch.ones(3))
    assert scale_grad(None, torch.tensor(1.0)) is None


def test_rows_per_chunk():
    assert rows_per_chunk(1000, None, 10_000) == 10
    assert rows_per_chunk(1000, 3, 10_000) == 3
    assert rows_per_chunk(10**6, None, 10) == 1
