"""The nn.Module forms: keywords fixed and checked at construction, same values as the functions."""

from __future__ import annotations

import math

import pytest
import torch

import vpd_kernels as vk

from .helpers import assert_rel_close, distill_rows64, make_logits


def test_distill_loss_module():
    student, teacher, ref = make_logits(2, 3, 13, seed=13)
    module = vk.DistillLoss(
        divergence="jsd", beta=0.2, ref_coef=0.5, reduction="sum", backend="torch"
    )
    assert "jsd" in repr(module)
    expected = distill_rows64(student, teacher, "jsd", beta=0.2, ref=ref, ref_coef=0.5).sum()
    assert math.isclose(
        float(module(student, teacher, ref_logits=ref)), float(expected), rel_tol=1e-5
    )


def test_fused_linear_module():
    g = torch.Generator().manual_seed(4)
    sh, th = torch.randn(7, 8, generator=g), torch.randn(7, 8, generator=g)
    sw, tw = torch.randn(45, 8, generator=g), torch.randn(45, 8, generator=g)
    module = vk.FusedLinearDistillLoss(divergence="forward_kl", reduction="sum", backend="torch")
    loss = module(sh, sw, th, tw)
    expected = distill_rows64(
        sh.double() @ sw.double().T, th.double() @ tw.double().T, "forward_kl"
    )
    assert_rel_close(loss.detach(), expected.sum())


@pytest.mark.parametrize("module", [vk.DistillLoss, vk.FusedLinearDistillLoss])
def test_bad_keywords_fail_at_construction(module):
    with pytest.raises(ValueError, match="divergence"):
        module(divergence="kl")


def test_unknown_or_per_call_keywords_fail_at_construction():
    with pytest.raises(ValueError, match="unknown keywords"):
        vk.DistillLoss(temprature=2.0)
    with pytest.raises(ValueError, match="go to forward"):
        vk.FusedLinearDistillLoss(labels=torch.zeros(3, dtype=torch.long))


def test_modules_take_labels():
    student, teacher, _ = make_logits(2, 4, 9, seed=14)
    labels = torch.tensor([[1, 2, -100, 3], [-100, -100, 0, 8]])
    module = vk.DistillLoss(ignore_index=-100, ce_coef=0.5, backend="torch")
    expected = vk.distill_loss(
        student, teacher, labels=labels, ignore_index=-100, ce_coef=0.5, backend="torch"
    )
    assert float(module(student, teacher, labels=labels)) == float(expected)
