"""Checks that need a CUDA device: real Triton compilation, production sizes, int64 offsets."""

from __future__ import annotations

import pytest
import torch

import vpd_kernels as vk
from vpd_kernels.rows import as_rows, top_ids

from .helpers import max_rel_err, topk_rows64

pytestmark = pytest.mark.gpu


def test_auto_backend_is_triton_and_matches_torch_at_production_vocab():
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (300, 151936)
    student = torch.randn(*shape, device="cuda", generator=g).bfloat16().requires_grad_(True)
    teacher = torch.randn(*shape, device="cuda", generator=g).bfloat16()
    ref = torch.randn(*shape, device="cuda", generator=g).bfloat16()
    results = []
    for backend in ("auto", "torch"):
        student.grad = None
        loss, stats = vk.distill_loss(
            student, teacher, ref_logits=ref, ref_coef=0.1, backend=backend, return_stats=True
        )
        loss.backward()
        results.append((loss.detach(), student.grad.clone(), stats.entropy))
    (la, ga, ea), (lb, gb, eb) = results
    assert max_rel_err(la, lb) < 1e-5 and max_rel_err(ea, eb) < 1e-5
    assert max_rel_err(ga.float(), gb.float()) < 1e-2  # both round the same fp32 gradient to bf16


def test_more_rows_than_a_grid_dimension_and_int64_offsets():
    """N * V > 2**31 elements and more row blocks than the 65535 limit of grid dims 1 and 2."""
    n, v = 70000, 32768
    student = torch.zeros(n, v, device="cuda", dtype=torch.bfloat16)
    teacher = torch.zeros(n, v, device="cuda", dtype=torch.bfloat16)
    teacher[-1, 0] = 5.0  # only the last row differs, at an offset beyond 2**31
    student.requires_grad_(True)
    loss = vk.distill_loss(student, teacher, divergence="forward_kl", reduction="none")
    loss.sum().backward()
    assert loss[:-1].abs().max() < 1e-6 and loss[-1] > 1.0
    assert student.grad[-1, 0] < 0 and student.grad[:-1].abs().max() == 0


def test_fused_linear_on_gpu_matches_logits_in():
    g = torch.Generator(device="cuda").manual_seed(1)
    n, h, v = 1000, 256, 50000
    hidden = torch.randn(n, h, device="cuda", generator=g).bfloat16().requires_grad_(True)
    weight = (torch.randn(v, h, device="cuda", generator=g) * 0.05).bfloat16().requires_grad_(True)
    teacher_hidden = torch.randn(n, h, device="cuda", generator=g).bfloat16()
    loss = vk.fused_linear_distill_loss(hidden, weight, teacher_hidden, divergence="jsd")
    loss.backward()
    h2 = hidden.detach().clone().requires_grad_(True)
    expected = vk.distill_loss(
        h2 @ weight.detach().T, teacher_hidden @ weight.detach().T, divergence="jsd"
    )
    expected.backward()
    assert max_rel_err(loss.detach(), expected.detach()) < 1e-4
    assert max_rel_err(hidden.grad.float(), h2.grad.float()) < 2e-2


def test_teacher_topk_at_production_vocab():
    """SDPO's k = 100 with the tail, bf16 logits sliced as TRL does (read in place), both
    backends against float64 on the same top-k ids (bf16 logits tie at the k-th value)."""
    g = torch.Generator(device="cuda").manual_seed(2)
    full = torch.randn(4, 65, 151936, device="cuda", generator=g).bfloat16()
    teacher = torch.randn(4, 65, 151936, device="cuda", generator=g).bfloat16()[:, :-1]
    ids = top_ids(as_rows(teacher), 100, chunk=64).view(4, 64, 100)
    logprobs = torch.log_softmax(teacher.double() / 0.7, -1).gather(-1, ids)
    expected = topk_rows64(full[:, :-1], ids, logprobs, "reverse_kl", temperature=0.7)
    grads = []
    for backend in ("auto", "torch"):
        student = full.clone().requires_grad_(True)
        loss, stats = vk.distill_loss(
            student[:, :-1], teacher, teacher_topk=100, temperature=0.7, backend=backend,
            return_stats=True,
        )  # fmt: skip
        loss.backward()
        assert max_rel_err(stats.divergence, expected) < 5e-5  # float32 sums over 152k entries
        assert max_rel_err(loss, expected.mean()) < 5e-5
        grads.append(student.grad.float())
    assert max_rel_err(grads[0], grads[1]) < 1e-2  # both round the same fp32 gradient to bf16


def test_the_rounded_gradient_tile_is_the_cuda_default_and_at_the_floor():
    """On CUDA backward_dtype=None rounds the tile to the weight's bf16 and multiplies with
    float32-output GEMMs (torch.addmm(..., out_dtype=float32)): within 2x of the output floor of
    the float64 gradient of the same bf16 inputs, as the float32 tile is within 1.5x."""
    g = torch.Generator(device="cuda").manual_seed(3)
    n, h, v = 600, 512, 32000
    hidden = torch.randn(n, h, device="cuda", generator=g)
    weight = (torch.randn(v, h, device="cuda", generator=g) * 3 * h**-0.5).bfloat16()
    teacher = (hidden + 1e-3 * torch.randn(n, h, device="cuda", generator=g)).bfloat16()
    hidden = hidden.bfloat16()
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    log_s = torch.log_softmax(h64 @ w64.T, -1)
    log_t = torch.log_softmax(teacher.double() @ weight.double().T, -1)
    (log_s.exp() * (log_s - log_t)).sum(-1).mean().backward()
    grads = {}
    for tile, bar in ((None, 2.0), (torch.bfloat16, 2.0), (torch.float32, 1.5)):
        x, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        vk.fused_linear_distill_loss(x, w, teacher, backward_dtype=tile).backward()
        grads[tile] = (x.grad, w.grad)
        for ours, exact in ((x.grad, h64.grad), (w.grad, w64.grad)):
            err = float((ours.double() - exact).norm() / exact.norm())
            floor = float((exact.bfloat16().double() - exact).norm() / exact.norm())
            assert err <= bar * floor, (tile, err, floor)
    assert torch.equal(grads[None][1], grads[torch.bfloat16][1])  # the default is bf16 here
