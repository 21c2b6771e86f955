"""compat.liger.FusedLinearJSDLoss against Liger-Kernel's own LigerFusedLinearJSDLoss (its
chunked loss is plain torch; compiled=False keeps torch.compile out of the CPU test)."""

from __future__ import annotations

import importlib

import pytest
import torch

from vpd_kernels.compat.liger import FusedLinearJSDLoss

from .helpers import BACKENDS, assert_rel_close, distill_rows64, max_rel_err

chunked_loss = importlib.import_module("liger_kernel.chunked_loss")  # a dev dependency
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

N, H, HT, V = 9, 8, 6, 45  # odd sizes; the teacher has its own hidden size


def inputs(seed: int, dtype=torch.float32, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s).to(dtype)  # noqa: E731
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[0, 5, 6]] = -100
    return {
        "student_input": make(N, H),
        "student_weight": make(V, H, s=0.7),
        "teacher_input": make(N, HT),
        "teacher_weight": make(V, HT, s=0.7),
        "true_labels": labels,
        "student_bias": make(V) if bias else None,
        "teacher_bias": make(V) if bias else None,
    }


def run(module, x):
    """Loss (or the three losses) and the gradients of the student's input, weight and bias."""
    leaves = {k: x[k].clone().requires_grad_(True) for k in ("student_input", "student_weight")}
    if x["student_bias"] is not None:
        leaves["student_bias"] = x["student_bias"].clone().requires_grad_(True)
    out = module(**{**x, **leaves})
    loss = out[0] if isinstance(out, tuple) else out
    (loss * 1.7).backward()
    return out, [leaves[k].grad for k in sorted(leaves)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize(("weight_hard", "temperature"), [(0.5, 1.0), (0.3, 2.0), (0.0, 0.7)])
def test_same_loss_and_gradients_as_liger(backend, beta, weight_hard, temperature):
    kw = {"weight_hard_loss": weight_hard, "weight_soft_loss": 1 - weight_hard * 0.5}
    kw.update(beta=beta, temperature=temperature, return_soft_hard_loss=True)
    x = inputs(seed=int(beta * 10 + weight_hard * 100))
    ours, ours_grads = run(FusedLinearJSDLoss(chunk_size=4, backend=backend, **kw), x)
    theirs, their_grads = run(chunked_loss.LigerFusedLinearJSDLoss(compiled=False, **kw), x)
    for a, b in zip(ours, theirs, strict=True):  # loss, soft, hard
        assert_rel_close(a, b.double(), rtol=3e-6)
    for a, b in zip(ours_grads, their_grads, strict=True):
        assert_rel_close(a, b.double(), rtol=3e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_biases_all_ignored_and_plain_loss(backend):
    x = inputs(seed=3, bias=False)
    ours, ours_grads = run(FusedLinearJSDLoss(backend=backend), x)
    theirs, their_grads = run(chunked_loss.LigerFusedLinearJSDLoss(compiled=False), x)
    assert_rel_close(ours, theirs.double(), rtol=3e-6)
    for a, b in zip(ours_grads, their_grads, strict=True):
        assert_rel_close(a, b.double(), rtol=3e-6)
    x["true_labels"] = torch.full((N,), -100)
    ours, ours_grads = run(FusedLinearJSDLoss(backend=backend), x)
    assert float(ours.detach()) == 0.0 and not any(g.any() for g in ours_grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_no_worse_than_liger(backend):
    """Liger rounds its logits to bf16 and computes its soft loss in bf16; this one keeps float32
    logits from the same bf16 inputs. Both against float64 built from those bf16 inputs."""
    x = inputs(seed=4, dtype=torch.bfloat16, bias=False)
    ours, ours_grads = run(FusedLinearJSDLoss(backend=backend), x)
    theirs, their_grads = run(chunked_loss.LigerFusedLinearJSDLoss(compiled=False), x)
    h, w = x["student_input"], x["student_weight"]
    logits = (h.double() @ w.double().T).requires_grad_(True)
    teacher = x["teacher_input"].double() @ x["teacher_weight"].double().T
    keep, labels = x["true_labels"] != -100, x["true_labels"].clamp_min(0)
    rows = distill_rows64(logits, teacher, "jsd", labels=labels, ce_coef=1.0)  # both weights 0.5
    exact = 0.5 * (rows * keep).sum() / keep.sum()
    (exact * 1.7).backward()
    exact_grads = [logits.grad @ w.double(), logits.grad.T @ h.double()]
    assert max_rel_err(ours, exact) <= max_rel_err(theirs, exact)
    for a, b, e in zip(ours_grads, their_grads, exact_grads, strict=True):
        assert a.dtype == torch.bfloat16
        assert max_rel_err(a, e) <= max_rel_err(b, e) + 1e-2  # as test_fused_linear


def test_refusals_say_why():
    x = inputs(seed=5)
    x["teacher_weight"] = torch.randn(V + 3, HT)
    x["teacher_bias"] = None
    with pytest.raises(ValueError, match="slice the teacher's head"):
        FusedLinearJSDLoss(backend="torch")(**x)
    x = inputs(seed=5)
    x["true_labels"][1] = -1
    with pytest.raises(ValueError, match="only ignore_index=-100"):
        FusedLinearJSDLoss(backend="torch")(**x)
