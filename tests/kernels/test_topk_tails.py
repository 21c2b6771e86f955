"""Top-k tails that hold almost nothing: rows whose top-k mass rounds to 1 in float32 (and in
bf16), the case where one minus a sum of probabilities gives a tail of 0 and reverse KL's
s_tail * (log s_tail - log t_tail) is inf. Against float64 bucketed references."""

from __future__ import annotations

import math

import pytest
import torch

import vpd_kernels as vk
from vpd_kernels.rows import as_rows, top_ids

from .helpers import BACKENDS, DIVERGENCES, loss_and_grad, topk_rows64

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

ROWS, V, K = 6, 96, 5


def confident(tail: float, seed: int) -> torch.Tensor:
    """Logits whose K largest entries hold all but about `tail` of the mass (at T = 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, V, generator=g) * 0.3
    gap = math.log((V - K) / (K * tail))
    top = torch.rand(ROWS, V, generator=g).argsort(-1)[:, :K]
    return x.scatter_add(-1, top, torch.full((ROWS, K), gap)) - gap


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("topk_from", ["teacher", "student"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_tails_that_round_to_zero(backend, divergence, topk_from, dtype):
    # The student's top-5 mass is 1 - 1.7e-8, the teacher's at the same ids 1 - 9.9e-8 (the
    # quickstart's non-finite row); the teacher shares the student's top ids.
    student = confident(1.7e-8, seed=0).to(dtype)
    teacher = student.float() + 0.2 * torch.randn(
        ROWS, V, generator=torch.Generator().manual_seed(1)
    )
    teacher = teacher.to(dtype)
    top = student.float().topk(K, dim=-1).indices
    teacher = (
        teacher.float().scatter_add(-1, top, torch.full((ROWS, K), -math.log(9.9 / 1.7))).to(dtype)
    )
    kw = {"divergence": divergence, "beta": 0.4}
    ranked = student if topk_from == "student" else teacher
    ids = ranked.double().topk(K, dim=-1).indices
    mass = torch.softmax(student.float(), -1).gather(-1, ids).sum(-1)
    assert (mass == 1).any()  # float32 rounds the student's top-k mass to 1
    ours, grad = loss_and_grad(
        lambda x: vk.distill_loss(
            x, teacher, teacher_topk=K, topk_from=topk_from, backend=backend, block_v=32, **kw
        ),
        student,
    )
    logprobs = torch.log_softmax(teacher.double(), -1).gather(-1, ids)
    exact, exact_grad = loss_and_grad(
        lambda x: topk_rows64(x, ids, logprobs, **kw).mean(), student.double()
    )
    assert torch.isfinite(ours) and float(exact) > 0
    assert abs(float(ours) - float(exact)) <= 1e-3 * float(exact)
    err = float((grad.double() - exact_grad).norm() / exact_grad.norm())
    floor = float((exact_grad.to(dtype).double() - exact_grad).norm() / exact_grad.norm())
    assert err <= 1.5 * floor + 1e-4, (err, floor)


@pytest.mark.parametrize("topk_from", ["teacher", "student"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_at_the_kth_logit(backend, topk_from):
    """Three entries tie at the k-th largest logit of the ranking side (one is an id, two are
    the tail, by the lowest-column rule), the other side is confident: no cancellation of the
    tied id's mass against the tail."""
    student = confident(1e-9, seed=3)
    teacher = student + 0.1 * torch.randn(ROWS, V, generator=torch.Generator().manual_seed(4))
    ranked = teacher if topk_from == "teacher" else student
    top = ranked.topk(K, dim=-1).indices
    kth, spare = top[:, -1:], ranked.argsort(-1)[:, :2]  # two of the smallest entries tie too
    ranked.scatter_(-1, spare, ranked.gather(-1, kth).expand(-1, 2))
    ids = top_ids(as_rows(ranked), K, chunk=4)
    assert (ranked.gather(-1, ids).min(-1).values[:, None] == ranked).sum(-1).min() == 3
    kw = {"divergence": "reverse_kl", "temperature": 0.8}
    ours, grad = loss_and_grad(
        lambda x: vk.distill_loss(
            x, teacher, teacher_topk=K, topk_from=topk_from, backend=backend, block_v=32, **kw
        ),
        student,
    )
    logprobs = torch.log_softmax(teacher.double() / 0.8, -1).gather(-1, ids)
    exact, exact_grad = loss_and_grad(
        lambda x: topk_rows64(x, ids, logprobs, **kw).mean(), student.double()
    )
    assert abs(float(ours) - float(exact)) <= 1e-4 * float(exact)
    assert float((grad.double() - exact_grad).norm() / exact_grad.norm()) <= 1e-5
