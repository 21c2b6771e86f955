"""fused_linear_distill_loss against float64 logits = hidden @ weight.T and the reference loss."""

from __future__ import annotations

import pytest
import torch

import vpd_kernels as vk
from vpd_kernels.fused_linear import gradient_tile

from .helpers import (
    BACKENDS,
    assert_rel_close,
    distill_rows64,
    max_rel_err,
    reduce64,
    topk_rows64,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

N, H, V = 7, 8, 45


def inputs(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    return {
        "sh": make(N, H),
        "sw": make(V, H) * 0.7,
        "th": make(N, H),
        "tw": make(V, H) * 0.7,
        "rh": make(N, H),
        "mask": torch.rand(N, generator=g) * 2,
        "grad_out": torch.randn(N, generator=g),
    }


def run_ours(x, backend, reduction, shared_teacher_weight=False, **kw):
    sh = x["sh"].clone().requires_grad_(True)
    sw = x["sw"].clone().requires_grad_(True)
    loss, stats = vk.fused_linear_distill_loss(
        sh,
        sw,
        x["th"],
        None if shared_teacher_weight else x["tw"],
        ref_hidden=x["rh"],
        ref_coef=0.3,
        mask=x["mask"],
        reduction=reduction,
        backend=backend,
        chunk_size=3,  # 7 rows: chunks of 3, 3, 1
        block_v=16,
        return_stats=True,
        **kw,
    )
    grad_out = x["grad_out"] if reduction == "none" else torch.tensor(1.3)
    (loss * grad_out).sum().backward()
    return loss.detach(), sh.grad, sw.grad, stats


def run_reference(x, reduction, shared_teacher_weight=False, **kw):
    sh = x["sh"].double().requires_grad_(True)
    sw = x["sw"].double().requires_grad_(True)
    tw = sw.detach() if shared_teacher_weight else x["tw"].double()
    rows = distill_rows64(
        sh @ sw.T, x["th"].double() @ tw.T, ref=x["rh"].double() @ sw.detach().T, ref_coef=0.3, **kw
    )
    loss = reduce64(rows, x["mask"], reduction)
    grad_out = x["grad_out"].double() if reduction == "none" else torch.tensor(1.3).double()
    (loss * grad_out).sum().backward()
    return loss.detach(), sh.grad, sw.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_reference(backend, divergence, reduction):
    x = inputs(seed=0)
    kw = {"divergence": divergence, "beta": 0.4, "temperature": 1.5}
    loss, grad_h, grad_w, stats = run_ours(x, backend, reduction, **kw)
    expected, expected_h, expected_w = run_reference(x, reduction, **kw)
    assert_rel_close(loss, expected)
    assert_rel_close(grad_h, expected_h)
    assert_rel_close(grad_w, expected_w)
    assert stats.ref_kl is not None and stats.entropy.shape == (N,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_teacher_weight_and_sum(backend):
    x = inputs(seed=1)
    loss, grad_h, grad_w, _ = run_ours(x, backend, "sum", shared_teacher_weight=True)
    expected, expected_h, expected_w = run_reference(
        x, "sum", shared_teacher_weight=True, divergence="reverse_kl"
    )
    assert_rel_close(loss, expected)
    assert_rel_close(grad_h, expected_h)
    assert_rel_close(grad_w, expected_w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_no_worse_than_eager(backend):
    x = inputs(seed=2, dtype=torch.bfloat16)
    ours, ours_h, ours_w, _ = run_ours(x, backend, "mean")
    expected, expected_h, expected_w = run_reference(x, "mean", divergence="reverse_kl")

    sh = x["sh"].clone().requires_grad_(True)
    sw = x["sw"].clone().requires_grad_(True)
    log_s = torch.log_softmax(sh @ sw.T, -1)
    log_t = torch.log_softmax(x["th"] @ x["tw"].T, -1)
    log_q = torch.log_softmax(x["rh"] @ x["sw"].T, -1)
    rows = (log_s.exp() * (log_s - log_t)).sum(-1) + 0.3 * (log_s.exp() * (log_s - log_q)).sum(-1)
    w = x["mask"].to(rows.dtype)
    eager = (rows * w).sum() / w.sum()
    (eager * 1.3).backward()

    assert ours_h.dtype == torch.bfloat16 and ours_w.dtype == torch.bfloat16
    assert max_rel_err(ours, expected) <= max_rel_err(eager.detach(), expected) + 1e-3
    assert max_rel_err(ours_h, expected_h) <= max_rel_err(sh.grad, expected_h) + 1e-2
    assert max_rel_err(ours_w, expected_w) <= max_rel_err(sw.grad, expected_w) + 1e-2


def test_all_masked_and_frozen_weight():
    x = inputs(seed=3)
    sh = x["sh"].clone().requires_grad_(True)
    loss = vk.fused_linear_distill_loss(
        sh, x["sw"], x["th"], mask=torch.zeros(N, dtype=torch.bool), backend="torch"
    )
    loss.backward()
    assert float(loss.detach()) == 0.0 and not sh.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("topk", [None, 6])
def test_biases_labels_cross_entropy_and_teacher_topk(backend, reduction, topk):
    x = inputs(seed=5)
    g = torch.Generator().manual_seed(6)
    sb, tb = torch.randn(V, generator=g), torch.randn(V, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[1, 4]] = -100
    sh = x["sh"].clone().requires_grad_(True)
    sw = x["sw"].clone().requires_grad_(True)
    sbias = sb.clone().requires_grad_(True)
    kw = {"divergence": "jsd", "beta": 0.3, "temperature": 0.9}
    loss = vk.fused_linear_distill_loss(
        sh, sw, x["th"], x["tw"], student_bias=sbias, teacher_bias=tb, labels=labels,
        ignore_index=-100, ce_coef=0.4, teacher_topk=topk, reduction=reduction,
        backend=backend, chunk_size=3, block_v=16, **kw,
    )  # fmt: skip
    grad_out = x["grad_out"] if reduction == "none" else torch.tensor(1.3)
    (loss * grad_out).sum().backward()

    h64, w64, b64 = (t.double().requires_grad_(True) for t in (x["sh"], x["sw"], sb))
    teacher64 = x["th"].double() @ x["tw"].double().T + tb.double()
    keep, safe = labels != -100, labels.clamp_min(0)
    anchors = {"labels": safe, "ce_coef": 0.4}
    if topk is None:
        rows = distill_rows64(h64 @ w64.T + b64, teacher64, **kw, **anchors)
    else:
        ids = torch.topk(x["th"] @ x["tw"].T + tb, topk).indices
        logprobs = torch.log_softmax(teacher64 / 0.9, -1).gather(-1, ids)
        rows = topk_rows64(h64 @ w64.T + b64, ids, logprobs, **kw, **anchors)
    expected = reduce64(rows, keep, reduction)
    (expected * grad_out.double()).sum().backward()
    assert_rel_close(loss.detach(), expected.detach())
    for ours, ref in ((sh.grad, h64.grad), (sw.grad, w64.grad), (sbias.grad, b64.grad)):
        assert_rel_close(ours, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sliced_hidden_states(backend):
    """Hidden states sliced like TRL's logits[:, :-1] (rows with two strides)."""
    g = torch.Generator().manual_seed(7)
    full = torch.randn(2, 5, H, generator=g)
    teacher = torch.randn(2, 5, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    h = full.clone().requires_grad_(True)
    loss = vk.fused_linear_distill_loss(
        h[:, 1:], weight, teacher[:, :-1], backend=backend, chunk_size=3, block_v=16
    )
    loss.backward()
    h64 = full[:, 1:].double().requires_grad_(True)
    expected = distill_rows64(
        h64 @ weight.double().T, teacher[:, :-1].double() @ weight.double().T, "reverse_kl"
    ).mean()
    expected.backward()
    assert_rel_close(loss.detach(), expected.detach())
    assert_rel_close(h.grad[:, 1:], h64.grad)
    assert not h.grad[:, 0].any()


def test_a_float16_gradient_tile_is_scaled_not_flushed():
    """A mean over many tokens makes gradient entries of ~1e-9, below float16's smallest
    subnormal: the tile is scaled by a power of two before rounding, and alpha undoes it."""
    grad = torch.randn(7, 300, dtype=torch.float32) * 1e-9
    tile, alpha = gradient_tile(grad.clone(), torch.float16)
    assert tile.dtype == torch.float16 and tile.abs().max() < 2**14
    restored = tile.float() * alpha
    assert ((restored - grad).abs() <= 2**-11 * grad.abs() + 1e-30).all()
    tile, alpha = gradient_tile(grad.clone(), torch.bfloat16)  # float32's range: no scaling
    assert alpha == 1.0 and torch.equal(tile, grad.to(torch.bfloat16))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backward_dtype_default_on_cpu_is_the_exact_float32_path(backend):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(9, 16, generator=g).bfloat16()
    w = (torch.randn(50, 16, generator=g) * 0.3).bfloat16()
    th = (h.float() + 0.01 * torch.randn(9, 16, generator=g)).bfloat16()
    grads = {}
    for backward_dtype in (None, torch.float32, torch.bfloat16):
        sh, sw = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        vk.fused_linear_distill_loss(
            sh, sw, th, backend=backend, chunk_size=4, backward_dtype=backward_dtype
        ).backward()
        grads[backward_dtype] = (sh.grad, sw.grad)
    assert all(torch.equal(a, b) for a, b in zip(grads[None], grads[torch.float32], strict=True))
    assert not torch.equal(grads[None][1], grads[torch.bfloat16][1])  # the rounding is real


def test_backward_dtype_must_be_a_float_dtype():
    h, w = torch.randn(3, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"backward_dtype must be None .* got torch.int8"):
        vk.fused_linear_distill_loss(h, w, h, backward_dtype=torch.int8)
    with pytest.raises(ValueError, match="backward_dtype must be None"):
        vk.FusedLinearDistillLoss(backward_dtype="bf16")
