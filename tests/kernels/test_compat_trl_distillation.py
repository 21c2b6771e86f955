"""compat.trl.chunked_divergence_loss against TRL 1.16's own
`trl.trainer.distillation_trainer._chunked_divergence_loss` (DistillationTrainer's loss)."""

from __future__ import annotations

import pytest
import torch

from vpd_kernels.compat.trl import chunked_divergence_loss

from .helpers import BACKENDS, assert_rel_close

pytestmark = pytest.mark.filterwarnings("ignore")

B, K, HS, HT, V = 2, 5, 16, 24, 70


def inputs(seed: int, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(dtype)  # noqa: E731
    mask = torch.ones(B, K, dtype=torch.long)
    mask[0, :2] = 0
    return {
        "student_hidden_states": make(B, K, HS),
        "teacher_hidden_states": make(B, K, HT),
        "student_lm_head_weight": make(V, HS, scale=0.5),
        "teacher_lm_head_weight": make(V, HT, scale=0.5),
        "completion_mask": mask,
        "student_lm_head_bias": make(V),
        "teacher_lm_head_bias": make(V),
    }


def run(fn, x: dict, **kw):
    leaves = {k: x[k].clone().requires_grad_(True) for k in
              ("student_hidden_states", "student_lm_head_weight", "student_lm_head_bias")}  # fmt: skip
    loss, entropy_sum, n_valid = fn(**{**x, **leaves}, **kw)
    (loss * 1.3).backward()
    return (loss.detach(), entropy_sum, n_valid), [leaves[k].grad for k in leaves]


CASES = [
    {"beta": 0.0},
    {"beta": 1.0, "temperature": 0.7},
    {"beta": 0.4, "num_items_in_batch": torch.tensor(11)},
    {"beta": 0.5, "student_logit_scale": 0.25, "teacher_logit_scale": 1.5},  # Cohere
    {"beta": 1.0, "student_final_logit_softcapping": 3.0, "temperature": 1.3},  # Gemma 2/3
    {"beta": 0.2, "student_final_logit_softcapping": 2.0, "teacher_final_logit_softcapping": 5.0,
     "student_logit_scale": 2.0, "num_items_in_batch": 4},
]  # fmt: skip


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_same_numbers_and_gradients_as_trl(backend, case):
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    x = inputs(seed=case)
    ours, our_grads = run(chunked_divergence_loss, x, backend=backend, **CASES[case])
    theirs, their_grads = run(_chunked_divergence_loss, x, **CASES[case])
    assert int(ours[2]) == int(theirs[2]) == B * K - 2
    assert_rel_close(ours[0], theirs[0], rtol=2e-5)
    assert_rel_close(ours[1], theirs[1], rtol=2e-5)
    for a, b in zip(our_grads, their_grads, strict=True):
        assert_rel_close(a, b, rtol=2e-5)


def test_bf16_at_least_as_exact_as_trl():
    """From the same bf16 inputs with a near-identical teacher, against float64 (TRL itself on
    the bf16 inputs upcast): no worse than TRL, which is at the bf16 output floor."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    x = inputs(seed=9, dtype=torch.bfloat16)
    h = x["student_hidden_states"].float()
    noise = torch.randn(h.shape, generator=torch.Generator().manual_seed(10))
    x["teacher_hidden_states"] = (h + 3e-3 * noise).to(torch.bfloat16)
    x["teacher_lm_head_weight"] = x["student_lm_head_weight"]
    x["teacher_lm_head_bias"] = x["student_lm_head_bias"]
    ours, our_grads = run(chunked_divergence_loss, x, beta=1.0, backend="torch")
    theirs, their_grads = run(_chunked_divergence_loss, x, beta=1.0)
    x64 = {k: v.double() if v.is_floating_point() else v for k, v in x.items()}
    exact, exact_grads = run(_chunked_divergence_loss, x64, beta=1.0)  # TRL runs in float64
    for a, b, e in zip(our_grads, their_grads, exact_grads, strict=True):
        err_a, err_b = (float((g.double() - e).norm() / e.norm()) for g in (a, b))
        assert a.dtype == torch.bfloat16 and err_a <= err_b * 1.05 + 1e-6
    assert abs(float(ours[0]) - float(exact[0])) <= abs(float(theirs[0]) - float(exact[0])) + 1e-7
