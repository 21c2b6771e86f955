"""Top-k teachers: topk_distill_loss and the `teacher_topk` option, against float64, both
backends (the Triton kernel of ops/topk.py and the torch rows)."""

from __future__ import annotations

import pytest
import torch

import vpd_kernels as vk
from vpd_kernels.rows import as_rows, top_ids

from .helpers import (
    BACKENDS,
    DIVERGENCES,
    assert_rel_close,
    distill_rows64,
    loss_and_grad,
    make_logits,
    max_rel_err,
    reduce64,
    topk_rows64,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def teacher_topk(teacher: torch.Tensor, k: int, temperature: float = 1.0):
    """What an inference server returns: the k most likely ids and their log-probabilities
    (float64: the references of `teacher_topk=k` use them as they are, the given-top-k cases
    pass them as float32 to both sides)."""
    logprobs, ids = torch.log_softmax(teacher.double() / temperature, -1).topk(k, dim=-1)
    return ids, logprobs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", [True, False])
def test_topk_loss_matches_float64(backend, divergence, tail):
    student, teacher, ref = make_logits(3, 4, 50, seed=30)
    ids, logprobs = teacher_topk(teacher, 7, temperature=0.7)
    logprobs = logprobs.float()
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 50, (3, 4), generator=g)
    mask = torch.rand(3, 4, generator=g) * 2
    mask[1, 2] = 0.0
    ids[1, 2] = 0  # a masked token may carry any ids, even repeated ones
    kw = {"divergence": divergence, "beta": 0.3, "temperature": 0.7}
    ours, grad = loss_and_grad(
        lambda x: vk.topk_distill_loss(
            x, ids, logprobs, tail=tail, ref_logits=ref, ref_coef=0.2, labels=labels,
            ce_coef=0.5, mask=mask, backend=backend, block_v=16, **kw,
        ),
        student,
    )  # fmt: skip
    expected, expected_grad = loss_and_grad(
        lambda x: reduce64(
            topk_rows64(x, ids, logprobs, tail=tail, ref=ref, ref_coef=0.2, labels=labels,
                        ce_coef=0.5, **kw),
            mask,
            "mean",
        ),
        student.double(),
    )  # fmt: skip
    assert_rel_close(ours, expected)
    assert_rel_close(grad, expected_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_reduction_none_stats_and_bf16(backend):
    student, teacher, _ = make_logits(6, 64, seed=31, scale=3.0)
    ids, logprobs = teacher_topk(teacher, 5)
    logprobs = logprobs.float()
    grad_out = torch.randn(6, generator=torch.Generator().manual_seed(2))
    ours, grad = loss_and_grad(
        lambda x: vk.topk_distill_loss(x, ids, logprobs, reduction="none", backend=backend),
        student,
        grad_out,
    )
    expected, expected_grad = loss_and_grad(
        lambda x: topk_rows64(x, ids, logprobs, "reverse_kl"), student.double(), grad_out
    )
    assert_rel_close(ours, expected)
    assert_rel_close(grad, expected_grad)
    _, stats = vk.topk_distill_loss(student, ids, logprobs, backend=backend, return_stats=True)
    assert_rel_close(stats.divergence, expected)
    half = student.bfloat16()
    ours_h, grad_h = loss_and_grad(lambda x: vk.topk_distill_loss(x, ids, logprobs), half)
    exp_h, exp_grad_h = loss_and_grad(
        lambda x: topk_rows64(x, ids, logprobs, "reverse_kl").mean(), half.double()
    )
    assert grad_h.dtype == torch.bfloat16
    assert max_rel_err(ours_h, exp_h) < 1e-5 and max_rel_err(grad_h, exp_grad_h) < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_teacher_topk_option_is_the_topk_of_the_teacher(backend, divergence):
    student, teacher, _ = make_logits(2, 5, 40, seed=32)
    ids, logprobs = teacher_topk(teacher, 6, temperature=1.5)
    kw = {"divergence": divergence, "temperature": 1.5}
    ours, grad = loss_and_grad(
        lambda x: vk.distill_loss(x, teacher, teacher_topk=6, backend=backend, block_v=16, **kw),
        student,
    )
    expected, expected_grad = loss_and_grad(
        lambda x: topk_rows64(x, ids, logprobs, **kw).mean(), student.double()
    )
    assert_rel_close(ours, expected)
    assert_rel_close(grad, expected_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_topk_from_student_ranks_the_students_tokens(backend, divergence):
    """SDPO's reference takes the k ids from the student; the teacher is read at those ids."""
    student, teacher, _ = make_logits(2, 5, 40, seed=34)
    ids = student.double().topk(6, dim=-1).indices
    logprobs = torch.log_softmax(teacher.double() / 0.8, -1).gather(-1, ids)
    kw = {"divergence": divergence, "temperature": 0.8}
    ours, grad = loss_and_grad(
        lambda x: vk.distill_loss(
            x, teacher, teacher_topk=6, topk_from="student", backend=backend, block_v=16, **kw
        ),
        student,
    )
    expected, expected_grad = loss_and_grad(
        lambda x: topk_rows64(x, ids, logprobs, **kw).mean(), student.double()
    )
    assert_rel_close(ours, expected)
    assert_rel_close(grad, expected_grad)
    by_teacher = vk.distill_loss(student, teacher, teacher_topk=6, backend=backend, **kw)
    assert max_rel_err(by_teacher, expected) > 1e-3  # the option changes which tokens count
    hidden = torch.randn(10, 8, generator=torch.Generator().manual_seed(3))
    weight = torch.randn(40, 8, generator=torch.Generator().manual_seed(4))
    t_hidden = torch.randn(10, 8, generator=torch.Generator().manual_seed(5))
    fused = vk.fused_linear_distill_loss(
        hidden, weight, t_hidden, teacher_topk=6, topk_from="student", backend=backend,
        chunk_size=3, **kw,
    )  # fmt: skip
    s_logits, t_logits = hidden.double() @ weight.double().T, t_hidden.double() @ weight.double().T
    f_ids = s_logits.topk(6, dim=-1).indices
    f_logprobs = torch.log_softmax(t_logits / 0.8, -1).gather(-1, f_ids)
    assert_rel_close(fused, topk_rows64(s_logits, f_ids, f_logprobs, **kw).mean())


def test_topk_from_must_name_a_distribution():
    student, teacher, _ = make_logits(2, 10, seed=35)
    with pytest.raises(ValueError, match="topk_from must be one of"):
        vk.distill_loss(student, teacher, teacher_topk=3, topk_from="mixture")


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_as_large_as_the_vocabulary_is_the_full_divergence(backend):
    student, teacher, _ = make_logits(4, 12, seed=33)
    full = distill_rows64(student, teacher, "forward_kl").mean()
    for_all = vk.distill_loss(
        student, teacher, divergence="forward_kl", teacher_topk=50, backend=backend
    )
    ids, logprobs = teacher_topk(teacher, 12)
    given = vk.topk_distill_loss(
        student, ids, logprobs.float(), divergence="forward_kl", backend=backend
    )
    assert_rel_close(for_all, full)
    assert_rel_close(given, full)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("given", [False, True])
def test_topk_exact_at_any_logit_scale(backend, divergence, given):
    """Offsets up to 1e4, and peaked teachers (tails down to 1e-8) at low temperature; the
    teacher as its logits (`teacher_topk`) or as given float32 log-probs."""
    student, teacher, _ = make_logits(3, 60, seed=34, scale=3.0)
    for offset, temperature in ((1e4, 0.25), (1e4, 1.0), (1e3, 0.5)):
        s, t = student + offset, teacher + offset
        ids, logprobs = teacher_topk(t, 8, temperature)
        logprobs = logprobs.float() if given else logprobs
        common = {"divergence": divergence, "temperature": temperature, "backend": backend}

        def ours_fn(x, t=t, ids=ids, logprobs=logprobs, common=common):
            if given:
                return vk.topk_distill_loss(x, ids, logprobs, **common)
            return vk.distill_loss(x, t, teacher_topk=8, **common)

        def reference(x, ids=ids, logprobs=logprobs, temperature=temperature):
            return topk_rows64(x, ids, logprobs, divergence, temperature=temperature).mean()

        ours, grad = loss_and_grad(ours_fn, s)
        expected, expected_grad = loss_and_grad(reference, s.double())
        assert_rel_close(ours, expected, rtol=1e-5)
        # atol: when the student's tail holds nearly all its mass, autograd (torch backend)
        # cancels dD/dP_tail against the row's sum, ~1e-8 of the loss per entry.
        assert_rel_close(grad, expected_grad, rtol=2e-5, atol=1e-7 * float(expected))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"ids": torch.full((2, 3, 4), 20)}, r"outside \[0, 20\)"),
        ({"ids": torch.zeros(2, 3, 4, dtype=torch.long)}, "repeats an id"),
        ({"ids": torch.zeros(2, 3, 21, dtype=torch.long)}, "1 <= k <= V"),
        ({"ids": torch.zeros(3, 2, 4, dtype=torch.long)}, "then k"),
        ({"ids": torch.zeros(2, 3, 4)}, "integer tensor"),
        ({"logprobs": torch.zeros(2, 3, 5)}, "one log-prob per id"),
        ({"teacher_topk": 0}, "teacher_topk must be"),
    ],
)
def test_topk_errors(change, match):
    student = torch.randn(2, 3, 20)
    ids = torch.arange(4).expand(2, 3, 4)
    logprobs = torch.full((2, 3, 4), -2.0)
    with pytest.raises(ValueError, match=match):
        if "teacher_topk" in change:
            vk.distill_loss(student, student, teacher_topk=change["teacher_topk"])
        else:
            vk.topk_distill_loss(student, change.get("ids", ids), change.get("logprobs", logprobs))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_ties_at_the_kth_teacher_logit(divergence):
    """Coarse (bf16-like) teacher logits tie at the k-th value: torch.topk keeps some of the
    tied entries; the tails count the others, on both backends."""
    student, teacher, _ = make_logits(6, 30, seed=35)
    teacher = torch.round(teacher * 2) / 2
    ids = top_ids(as_rows(teacher), 5, chunk=6)
    logprobs = torch.log_softmax(teacher.double(), -1).gather(-1, ids)
    expected, expected_grad = loss_and_grad(
        lambda x: topk_rows64(x, ids, logprobs, divergence).mean(), student.double()
    )
    for backend in BACKENDS:
        ours, grad = loss_and_grad(
            lambda x, b=backend: vk.distill_loss(
                x, teacher, teacher_topk=5, divergence=divergence, backend=b, block_v=8
            ),
            student,
        )
        assert_rel_close(ours, expected)
        assert_rel_close(grad, expected_grad)
