"""Fused-linear losses and log-probs in bf16 and fp16 against float64 built from the SAME
low-precision hidden states and heads, with a teacher that is the student plus a small
perturbation (self-distillation). The bar is the output floor: the exact float64 gradient
rounded once to the output dtype. Rounding the logits or grad_weight to bf16 misses it by orders
of magnitude at perturbation 1e-3 (cosine ~0.1)."""

from __future__ import annotations

import pytest
import torch

import vpd_kernels as vk

from .helpers import BACKENDS, DIVERGENCES, distill_rows64, token_logprobs64, topk_rows64

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

N, H, V, K = 12, 32, 192, 8
PERTURBATIONS = (1e-3, 1e-2, 1e-1)
# (teacher_topk, topk_from, ref_coef): full vocabulary with and without the trust region, top-k
# ranked by the teacher and by the student.
ROUTES = [(None, "teacher", 0.0), (None, "teacher", 0.3), (K, "teacher", 0.3), (K, "student", 0.0)]


def near_identical(dtype, eps: float, seed: int = 0):
    """Student hidden states, a head, the teacher's hidden states (student + eps relative noise)
    and a ref (student + 3 eps), all already rounded to `dtype`."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) * 3 * H**-0.5
    noise = lambda scale: scale * h.std() * torch.randn(N, H, generator=g)  # noqa: E731
    return h.to(dtype), w.to(dtype), (h + noise(eps)).to(dtype), (h + noise(3 * eps)).to(dtype)


def floor_and_cos(ours: torch.Tensor, exact: torch.Tensor) -> tuple[float, float, float]:
    """(relative error, the output floor's relative error, cosine) of a gradient."""
    exact = exact.double()
    norm = exact.norm()
    err = float((ours.double() - exact).norm() / norm)
    floor = float((exact.to(ours.dtype).double() - exact).norm() / norm)
    cos = float(torch.nn.functional.cosine_similarity(ours.double().flatten(), exact.flatten(), 0))
    return err, floor, cos


def reference(h, w, th, rh, divergence, topk, topk_from, ref_coef):
    """float64 loss and its gradients wrt hidden and head, from the same rounded inputs."""
    h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    student = h64 @ w64.T
    teacher = th.double() @ w.double().T
    anchors = {"ref": rh.double() @ w.double().T, "ref_coef": ref_coef} if ref_coef else {}
    if topk is None:
        rows = distill_rows64(student, teacher, divergence, beta=0.4, **anchors)
    else:
        ranked = student.detach() if topk_from == "student" else teacher
        ids = ranked.topk(topk, dim=-1).indices
        logprobs = torch.log_softmax(teacher, -1).gather(-1, ids)
        rows = topk_rows64(student, ids, logprobs, divergence, beta=0.4, **anchors)
    loss = rows.mean()
    loss.backward()
    return loss.detach(), h64.grad, w64.grad


# backward_dtype: None is float32 on a CPU (exact, at the floor: 1.5x allows the float32
# arithmetic); "rounded" forces the inputs' dtype, the GPU's default, whose rounding of the
# gradient tile before the float32-accumulated GEMMs costs at most as much again (2x).
BACKWARD = {"float32": (None, 1.5), "rounded": ("inputs", 2.0)}


@pytest.mark.parametrize("backward", BACKWARD)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("route", ROUTES, ids=["full", "full+ref", "topk+ref", "student-topk"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_distill_at_the_output_floor(backend, divergence, route, dtype, backward):
    topk, topk_from, ref_coef = route
    backward_dtype, bar = BACKWARD[backward]
    backward_dtype = dtype if backward_dtype == "inputs" else backward_dtype
    for eps in PERTURBATIONS:
        h, w, th, rh = near_identical(dtype, eps)
        sh, sw = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = vk.fused_linear_distill_loss(
            sh, sw, th, ref_hidden=rh if ref_coef else None, ref_coef=ref_coef,
            divergence=divergence, beta=0.4, teacher_topk=topk, topk_from=topk_from,
            backend=backend, chunk_size=5, block_v=64, backward_dtype=backward_dtype,
        )  # fmt: skip
        loss.backward()
        exact, grad_h, grad_w = reference(h, w, th, rh, divergence, topk, topk_from, ref_coef)
        # float32 normalisers: a divergence of ~eps^2 keeps about 1e-7 * log V absolute error
        assert abs(float(loss.detach()) - float(exact)) <= 2e-2 * abs(float(exact)) + 1e-6, eps
        for name, ours, want in (("hidden", sh.grad, grad_h), ("weight", sw.grad, grad_w)):
            assert ours.dtype == dtype
            err, floor, cos = floor_and_cos(ours, want)
            assert err <= bar * floor + 1e-4 and cos >= 0.9999, (name, eps, err, floor, cos)


@pytest.mark.parametrize("backward", BACKWARD)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_and_log_ratios(backend, dtype, backward):
    """Log-probs of the student and of a near-identical policy: their log-ratio (GRPO's ratio,
    the E-step's implicit reward) as exact as float32 allows, gradients at the floor."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (N,), generator=g)
    grad_out = torch.randn(N, generator=g)
    backward_dtype, bar = BACKWARD[backward]
    backward_dtype = dtype if backward_dtype == "inputs" else backward_dtype
    for eps in PERTURBATIONS:
        h, w, th, _ = near_identical(dtype, eps, seed=2)
        sh, sw = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        kw = {"backend": backend, "chunk_size": 5, "block_v": 64}
        logp = vk.fused_linear_token_logprobs(sh, sw, tokens, backward_dtype=backward_dtype, **kw)
        (logp * grad_out).sum().backward()
        with torch.no_grad():
            ratio = logp - vk.fused_linear_token_logprobs(th, w, tokens, **kw)
        h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
        exact = token_logprobs64(h64 @ w64.T, tokens)
        (exact * grad_out.double()).sum().backward()
        exact_ratio = exact.detach() - token_logprobs64(th.double() @ w.double().T, tokens)
        assert (logp.double() - exact.detach()).abs().max() <= 2e-6
        assert (ratio.double() - exact_ratio).abs().max() <= 2e-6 + 1e-3 * exact_ratio.abs().max()
        for ours, want in ((sh.grad, h64.grad), (sw.grad, w64.grad)):
            err, floor, cos = floor_and_cos(ours, want)
            assert err <= bar * floor + 1e-4 and cos >= 0.9999, (eps, err, floor, cos)


def distill_and_grads(backend, route, default_dtype):
    """Loss and gradients of bf16 inputs, computed while torch's default dtype is `default_dtype`."""
    topk, topk_from, ref_coef = route
    h, w, th, rh = near_identical(torch.bfloat16, 1e-3)
    sh, sw = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    tokens = torch.arange(N) % V
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        loss = vk.fused_linear_distill_loss(
            sh, sw, th, ref_hidden=rh if ref_coef else None, ref_coef=ref_coef, beta=0.4,
            teacher_topk=topk, topk_from=topk_from, backend=backend, chunk_size=5, block_v=64,
        )  # fmt: skip
        logp = vk.fused_linear_token_logprobs(sh, sw, tokens, backend=backend, chunk_size=5)
        (loss + logp.float().sum()).backward()
    finally:
        torch.set_default_dtype(previous)
    return loss.detach(), logp.detach(), sh.grad, sw.grad


@pytest.mark.parametrize("route", ROUTES, ids=["full", "full+ref", "topk+ref", "student-topk"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bfloat16_default_dtype_changes_nothing(backend, route):
    """Lightning's `precision: bf16-true` makes bfloat16 torch's default dtype during the
    training step: the float32 logits and gradient buffers must not follow it (they did, and
    grad_weight then met a float32 matmul: 'self and mat2 must have the same dtype')."""
    want = distill_and_grads(backend, route, torch.float32)
    got = distill_and_grads(backend, route, torch.bfloat16)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
