"""Bad input raises ValueError with a message that says what to change."""

from __future__ import annotations

import pytest
import torch

import vpd_kernels as vk

S = torch.randn(2, 3, 5)
T = torch.randn(2, 3, 5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"teacher_logits": torch.randn(2, 3, 6)}, "must match"),
        ({"teacher_logits": torch.randn(6, 5)}, "must match"),
        ({"student_logits": S.double()}, "float32, bfloat16 or float16"),
        ({"teacher_logits": T.long()}, "float32, bfloat16 or float16"),
        ({"divergence": "kl"}, "divergence must be one of"),
        ({"divergence": "jsd", "beta": 0.0}, r"strictly inside \(0, 1\)"),
        ({"divergence": "jsd", "beta": 1.0}, r"strictly inside \(0, 1\)"),
        ({"divergence": "jsd", "beta": 1.5}, r"strictly inside \(0, 1\)"),
        ({"temperature": 0.0}, "temperature must be"),
        ({"reduction": "avg"}, "reduction must be one of"),
        ({"ref_coef": 0.1}, "needs ref_logits"),
        ({"ref_coef": -1.0, "ref_logits": T}, "ref_coef must be"),
        ({"ref_logits": torch.randn(2, 3, 4)}, "ref_logits has shape"),
        ({"mask": torch.ones(2, 4, dtype=torch.bool)}, "one weight per token"),
        ({"mask": torch.ones(2, 3, dtype=torch.long)}, "bool mask or float weights"),
        ({"backend": "torch", "chunk_size": 0}, "chunk_size"),
        ({"backend": "triton", "block_v": 12}, "power of two"),
        ({"ce_coef": 0.5}, "ce_coef=0.5 needs labels"),
        ({"ignore_index": -100}, "needs labels"),
        ({"labels": torch.zeros(2, 3)}, "integer tensor"),
        ({"labels": torch.zeros(3, 2, dtype=torch.long)}, "one token id per row"),
        ({"ce_coef": -1.0}, "ce_coef must be"),
        ({"teacher_topk": 2.5}, "teacher_topk must be"),
    ],
)
def test_distill_loss_errors(kwargs, match):
    args = {"student_logits": S, "teacher_logits": T, **kwargs}
    with pytest.raises(ValueError, match=match):
        vk.distill_loss(args.pop("student_logits"), args.pop("teacher_logits"), **args)


@pytest.mark.parametrize(
    ("tokens", "match"),
    [
        (torch.zeros(2, 3), "integer tensor"),
        (torch.zeros(3, 2, dtype=torch.long), "one token id per row"),
    ],
)
def test_token_logprobs_errors(tokens, match):
    with pytest.raises(ValueError, match=match):
        vk.token_logprobs(S, tokens)
    with pytest.raises(ValueError, match=match):
        vk.fused_linear_token_logprobs(torch.randn(2, 3, 4), torch.randn(5, 4), tokens)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"student_weight": torch.randn(5, 3)}, r"shape \(V, H\)"),
        ({"student_weight": torch.randn(5, 4).half()}, "cast one so they match"),
        ({"teacher_weight": torch.randn(6, 4)}, "must match"),
        ({"teacher_hidden": torch.randn(3, 4)}, "must match"),
        ({"ref_coef": 0.5}, "needs ref_hidden"),
        ({"divergence": "jsd", "beta": 2.0}, "beta"),
        ({"student_bias": torch.randn(4)}, r"pass \(5,\)"),
        ({"teacher_bias": torch.randn(5).half()}, "dtype"),
    ],
)
def test_fused_linear_errors(kwargs, match):
    args = {
        "student_hidden": torch.randn(2, 3, 4),
        "student_weight": torch.randn(5, 4),
        "teacher_hidden": torch.randn(2, 3, 4),
        **kwargs,
    }
    positional = [args.pop(k) for k in ("student_hidden", "student_weight", "teacher_hidden")]
    with pytest.raises(ValueError, match=match):
        vk.fused_linear_distill_loss(*positional, **args)


def test_jsd_end_points_say_how_to_get_trl_and_liger_beta():
    with pytest.raises(ValueError, match="beta=0 is forward_kl, beta=1 reverse_kl"):
        vk.distill_loss(S, T, divergence="jsd", beta=0.0)


def test_a_misplaced_positional_argument_says_so():
    """Liger passes labels 5th; here everything after the teacher's weight is a keyword."""
    h, w, labels = torch.randn(6, 4), torch.randn(5, 4), torch.zeros(6, dtype=torch.long)
    with pytest.raises(TypeError, match="positional argument"):
        vk.fused_linear_distill_loss(h, w, h, w, labels)
    with pytest.raises(TypeError, match="positional argument"):
        vk.FusedLinearDistillLoss()(h, w, h, w, labels)
    with pytest.raises(TypeError, match="positional argument"):
        vk.distill_loss(S, T, "jsd")
