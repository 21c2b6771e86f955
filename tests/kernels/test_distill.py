"""distill_loss against an independent float64 reference, on both backends.

Triton cases run under TRITON_INTERPRET=1 on CPU, so they use a few rows and small vocabularies
with a small `block_v` that forces several vocabulary tiles per row.
"""

from __future__ import annotations

import math

import pytest
import torch

import vpd_kernels as vk

from .helpers import (
    BACKENDS,
    DIVERGENCES,
    assert_rel_close,
    distill_rows64,
    entropy64,
    kl64,
    loss_and_grad,
    make_logits,
    max_rel_err,
    reduce64,
)

# The interpreter evaluates padding rows beyond N (all -inf) with numpy, which warns; GPUs don't.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def check_against_reference(
    backend,
    student,
    teacher,
    *,
    mask=None,
    reduction="mean",
    grad_out=None,
    rtol=(1e-5, 1e-5),
    **kw,
):
    ours, ours_grad = loss_and_grad(
        lambda x: vk.distill_loss(
            x, teacher, mask=mask, reduction=reduction, backend=backend, block_v=16, **kw
        ),
        student,
        grad_out,
    )
    ref_kw = {k: v for k, v in kw.items() if k in ("divergence", "beta", "temperature", "ref_coef")}
    ref_kw["ref"] = kw.get("ref_logits")
    expected, expected_grad = loss_and_grad(
        lambda x: reduce64(distill_rows64(x, teacher, **ref_kw), mask, reduction),
        student.double(),
        grad_out,
    )
    assert ours.dtype == torch.float32
    assert_rel_close(ours, expected, rtol=rtol[0])
    assert_rel_close(ours_grad, expected_grad, rtol=rtol[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("with_ref", [False, True])
def test_divergences_temperatures_ref(backend, divergence, temperature, with_ref):
    student, teacher, ref = make_logits(2, 3, 45, seed=1)  # 6 rows, 3 tiles of 16 per row
    kw = {"ref_logits": ref, "ref_coef": 0.3} if with_ref else {}
    check_against_reference(
        backend, student, teacher, divergence=divergence, temperature=temperature, **kw
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_beta(backend, beta):
    student, teacher, ref = make_logits(5, 40, seed=2)
    check_against_reference(
        backend,
        student,
        teacher,
        divergence="jsd",
        beta=beta,
        temperature=0.7,
        ref_logits=ref,
        ref_coef=0.2,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [1, 7, 1000, 1031])
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_odd_vocab_sizes(backend, vocab, divergence):
    student, teacher, ref = make_logits(3, vocab, seed=vocab)
    ours, grad = loss_and_grad(
        lambda x: vk.distill_loss(
            x,
            teacher,
            divergence=divergence,
            ref_logits=ref,
            ref_coef=0.5,
            backend=backend,
            block_v=256,
        ),
        student,
    )
    expected, expected_grad = loss_and_grad(
        lambda x: distill_rows64(x, teacher, divergence, ref=ref, ref_coef=0.5).mean(),
        student.double(),
    )
    # atol: with V = 1 every value is 0 up to float32 cancellation of the log-sum-exps.
    assert_rel_close(ours, expected, atol=1e-6)
    assert_rel_close(grad, expected_grad, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "all_zero"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_masks_and_reductions(backend, mask_kind, reduction):
    student, teacher, ref = make_logits(3, 4, 20, seed=3)
    g = torch.Generator().manual_seed(4)
    mask = {
        "none": None,
        "bool": torch.rand(3, 4, generator=g) > 0.4,
        "float": torch.rand(3, 4, generator=g) * 2,
        "all_zero": torch.zeros(3, 4, dtype=torch.bool),
    }[mask_kind]
    grad_out = torch.randn(3, 4, generator=g) if reduction == "none" else torch.tensor(-1.7)
    check_against_reference(
        backend,
        student,
        teacher,
        mask=mask,
        reduction=reduction,
        grad_out=grad_out,
        divergence="reverse_kl",
        ref_logits=ref,
        ref_coef=0.4,
        temperature=1.3,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_garbage_rows_give_zero_not_nan(backend):
    student, teacher, _ = make_logits(4, 9, seed=5)
    student[1] = float("inf")  # a padding row full of junk, masked out
    teacher[1] = float("-inf")
    mask = torch.tensor([True, False, True, True])
    loss, grad = loss_and_grad(
        lambda x: vk.distill_loss(x, teacher, mask=mask, backend=backend), student
    )
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and not grad[1].any()
    loss0, grad0 = loss_and_grad(
        lambda x: vk.distill_loss(x, teacher, mask=mask & False, backend=backend), student
    )
    assert float(loss0) == 0.0 and not grad0.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_padded_vocab_minus_inf_in_both(backend, divergence):
    """Columns that are -inf in student and teacher behave as if the vocabulary were shorter."""
    student, teacher, ref = make_logits(5, 30, seed=6)
    pad = torch.zeros(30, dtype=torch.bool)
    pad[[3, 17, 25, 26, 27, 28, 29]] = True
    student[:, pad] = teacher[:, pad] = ref[:, pad] = float("-inf")
    kw = {"divergence": divergence, "beta": 0.3, "temperature": 0.8}
    ours, grad = loss_and_grad(
        lambda x: vk.distill_loss(
            x, teacher, ref_logits=ref, ref_coef=0.5, backend=backend, block_v=8, **kw
        ),
        student,
    )
    keep = ~pad
    expected, expected_grad = loss_and_grad(
        lambda x: distill_rows64(x, teacher[:, keep], ref=ref[:, keep], ref_coef=0.5, **kw).mean(),
        student[:, keep].double(),
    )
    assert_rel_close(ours, expected)
    assert_rel_close(grad[:, keep], expected_grad)
    assert torch.equal(grad[:, pad], torch.zeros_like(grad[:, pad]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_minus_inf_teacher_only(backend, divergence):
    """Teacher -inf where the student has mass: forward KL and JSD stay finite, reverse KL is +inf."""
    student, teacher, _ = make_logits(4, 24, seed=7)
    teacher[:, ::3] = float("-inf")  # e.g. a top-k teacher support
    ours, grad = loss_and_grad(
        lambda x: vk.distill_loss(
            x, teacher, divergence=divergence, backend=backend, block_v=8, reduction="none"
        ),
        student,
    )
    if divergence == "reverse_kl":
        assert torch.isposinf(ours).all()
        return
    expected, expected_grad = loss_and_grad(
        lambda x: distill_rows64(x, teacher, divergence, beta=0.5), student.double()
    )
    assert_rel_close(ours, expected)
    assert_rel_close(grad, expected_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats(backend):
    student, teacher, ref = make_logits(7, 50, seed=8)
    loss, stats = vk.distill_loss(
        student,
        teacher,
        divergence="forward_kl",
        temperature=2.0,
        ref_logits=ref,
        ref_coef=0.1,
        reduction="none",
        backend=backend,
        block_v=16,
        return_stats=True,
    )
    assert isinstance(stats, vk.DistillStats)
    assert_rel_close(
        stats.divergence, distill_rows64(student, teacher, "forward_kl", temperature=2.0)
    )
    p, q = torch.softmax(student.double(), -1), torch.softmax(ref.double(), -1)
    assert_rel_close(stats.ref_kl, kl64(p, q))
    assert_rel_close(stats.entropy, entropy64(student, temperature=2.0))
    assert_rel_close(loss, stats.divergence + 0.1 * stats.ref_kl)
    assert not stats.entropy.requires_grad
    _, no_ref = vk.distill_loss(student, teacher, backend=backend, return_stats=True)
    assert no_ref.ref_kl is None and no_ref.divergence.shape == (7,)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_backends_agree(divergence):
    student, teacher, ref = make_logits(37, 130, seed=9, scale=8.0)  # large logits, 37 rows
    mask = torch.rand(37, generator=torch.Generator().manual_seed(0)) > 0.2
    results = []
    for backend in BACKENDS:
        kw = {
            "divergence": divergence,
            "ref_logits": ref,
            "ref_coef": 0.2,
            "mask": mask,
            "backend": backend,
        }
        results.append(
            loss_and_grad(lambda x, kw=kw: vk.distill_loss(x, teacher, block_v=32, **kw), student)
        )
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert_rel_close(loss_a, loss_b.double())
    assert_rel_close(grad_a, grad_b.double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_half_precision_no_worse_than_eager(backend, dtype, divergence):
    student, teacher, ref = (x.to(dtype) for x in make_logits(6, 200, seed=10, scale=3.0))

    def eager(x):  # what a user would write in the same dtype
        log_s = torch.log_softmax(x, -1)
        log_t = torch.log_softmax(teacher, -1)
        if divergence == "reverse_kl":
            rows = (log_s.exp() * (log_s - log_t)).sum(-1)
        elif divergence == "forward_kl":
            rows = (log_t.exp() * (log_t - log_s)).sum(-1)
        else:
            log_m = torch.log(0.5 * log_s.exp() + 0.5 * log_t.exp())
            rows = 0.5 * (log_t.exp() * (log_t - log_m)).sum(-1) + 0.5 * (
                log_s.exp() * (log_s - log_m)
            ).sum(-1)
        log_q = torch.log_softmax(ref, -1)
        return (rows + 0.5 * (log_s.exp() * (log_s - log_q)).sum(-1)).mean()

    expected, expected_grad = loss_and_grad(
        lambda x: distill_rows64(x, teacher, divergence, ref=ref, ref_coef=0.5).mean(),
        student.double(),
    )
    eager_loss, eager_grad = loss_and_grad(eager, student)
    ours, grad = loss_and_grad(
        lambda x: vk.distill_loss(
            x,
            teacher,
            divergence=divergence,
            ref_logits=ref,
            ref_coef=0.5,
            backend=backend,
            block_v=64,
        ),
        student,
    )
    assert grad.dtype == dtype
    assert max_rel_err(ours, expected) <= max_rel_err(eager_loss, expected) + 1e-3
    assert max_rel_err(grad, expected_grad) <= max_rel_err(eager_grad, expected_grad) + 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_and_no_grad(backend):
    student, teacher, _ = make_logits(3, 11, seed=11)
    loss = vk.distill_loss(student.half(), teacher, backend=backend)  # fp16 student, fp32 teacher
    expected = distill_rows64(student.half(), teacher, "reverse_kl").mean()
    assert math.isclose(float(loss), float(expected), rel_tol=1e-5)
    assert not loss.requires_grad


def test_backward_twice_is_refused():
    student, teacher, _ = make_logits(2, 5, seed=12)
    student.requires_grad_(True)
    loss = vk.distill_loss(student, teacher, backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.25, 0.5, 1.0])
def test_exact_at_any_logit_scale(backend, divergence, temperature):
    """Logits offset by up to 1e4: float64 accuracy, as at offset 0 (running max kept apart)."""
    student, teacher, ref = make_logits(4, 70, seed=20, scale=3.0)
    for offset in (1e3, 1e4):
        s, t, r = student + offset, teacher + offset, ref - offset
        check_against_reference(
            backend,
            s,
            t,
            divergence=divergence,
            temperature=temperature,
            ref_logits=r,
            ref_coef=0.3,
            rtol=(1e-5, 2e-5),
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_labels_ignore_index_and_cross_entropy(backend, divergence):
    student, teacher, ref = make_logits(3, 5, 30, seed=21)
    labels = torch.randint(0, 30, (3, 5), generator=torch.Generator().manual_seed(0))
    labels[0, :2] = -100
    labels[2, 4] = -100
    kw = {"divergence": divergence, "temperature": 0.8, "ref_logits": ref, "ref_coef": 0.2}
    ours, grad = loss_and_grad(
        lambda x: vk.distill_loss(
            x, teacher, labels=labels, ignore_index=-100, ce_coef=0.7, backend=backend, **kw
        ),
        student,
    )
    keep = labels != -100
    safe = labels.clamp_min(0)
    ref_kw = {k: v for k, v in kw.items() if k != "ref_logits"}
    expected, expected_grad = loss_and_grad(
        lambda x: reduce64(
            distill_rows64(x, teacher, ref=ref, labels=safe, ce_coef=0.7, **ref_kw), keep, "mean"
        ),
        student.double(),
    )
    assert_rel_close(ours, expected)
    assert_rel_close(grad, expected_grad)
    # labels as a mask only (ce_coef=0) is `mask=labels != ignore_index`, and the statistics
    # carry the per-token cross-entropy
    as_mask, stats = vk.distill_loss(
        student, teacher, labels=labels, ignore_index=-100, backend=backend, return_stats=True
    )
    with_mask = vk.distill_loss(student, teacher, mask=keep, backend=backend)
    assert_rel_close(as_mask, with_mask.double())
    log_p = torch.log_softmax(student.double(), -1)
    assert_rel_close(stats.cross_entropy[keep], -log_p.gather(-1, safe[..., None])[..., 0][keep])


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_labels_raise(backend):
    student, teacher, _ = make_logits(2, 3, 10, seed=22)
    labels = torch.full((2, 3), 4)
    labels[1, 1] = -100
    with pytest.raises(ValueError, match="ignore_index=<that id>"):
        vk.distill_loss(student, teacher, labels=labels, backend=backend)
    labels[0, 0] = 10
    with pytest.raises(ValueError, match=r"outside \[0, 10\).*only ignore_index=-100"):
        vk.distill_loss(student, teacher, labels=labels, ignore_index=-100, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_are_read_in_place(backend):
    """TRL passes logits[:, :-1]: equal results to the contiguous copy, gradient to the slice."""
    full, teacher_full, _ = make_logits(3, 6, 40, seed=23)
    student = full.clone().requires_grad_(True)
    loss = vk.distill_loss(
        student[:, :-1], teacher_full[:, 1:], divergence="jsd", backend=backend, block_v=16
    )
    loss.backward()
    expected, expected_grad = loss_and_grad(
        lambda x: distill_rows64(x, teacher_full[:, 1:], "jsd").mean(), full[:, :-1].double()
    )
    assert_rel_close(loss.detach(), expected)
    assert_rel_close(student.grad[:, :-1], expected_grad)
    assert not student.grad[:, -1].any()
