"""`trainer.precision: bf16-true` trains every method end to end, and warns what it rounds away.
Lightning makes bfloat16 torch's default dtype during the training step, so every float32
buffer the step creates must say so (the fused losses' gradient buffers did not, and failed).
Its weights have no float32 copy, so small updates vanish: the run says so, with the threshold;
the GPU recipes use bf16-mixed."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import pytest
import torch

from vpd_lightning.cli import main
from vpd_lightning.policy.snapshots import WeightSnapshot
from vpd_lightning.rollout.sampling import Attempts
from vpd_lightning.tasks import Verdict
from vpd_lightning.trainer.half_precision import HALF_MANTISSA_STEPS, half_precision_update_warning

ROOT = Path(__file__).resolve().parents[2]


def fit_tiny(method: str, precision: str):
    return main(
        ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--model.method", method]
        + ["--trainer.precision", precision, "--trainer.max_steps", "2"]
        + ["--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0"]
    )


@pytest.mark.slow
@pytest.mark.parametrize("method", ["vpd", "sdpo", "grpo"])
def test_bf16_true_trains_every_method(tmp_path, monkeypatch, method):
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="stored in bfloat16 with no float32 copy") as caught:
        cli = fit_tiny(method, "bf16-true")
    [message] = [str(w.message) for w in caught if "float32 copy" in str(w.message)]
    assert "lr = 0.001" in message and "larger than about 0.26" in message
    assert "Use trainer.precision: bf16-mixed" in message
    assert cli.trainer.global_step == 2
    assert {p.dtype for p in cli.model.policy.model.parameters()} == {torch.bfloat16}
    rows = list(csv.DictReader((tmp_path / "runs/tiny/version_0/metrics.csv").open()))
    losses = [float(r["mstep/loss"]) for r in rows if r.get("mstep/loss")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    if method == "vpd":  # the E-step ran at step 2
        assert [r["estep/loss"] for r in rows if r.get("estep/loss")]


def test_rewards_stay_float32_under_a_bfloat16_default_dtype():
    verdicts = [Verdict(reward=0.3, feedback=""), Verdict(reward=1.0, feedback="")]
    attempts = Attempts(
        records=[{}], prompt_ids=[[1]], completion_ids=[[2], [3]], texts=["a", "b"],
        verdicts=verdicts, n=2,
    )  # fmt: skip
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        rewards = attempts.rewards()
    finally:
        torch.set_default_dtype(previous)
    assert rewards.dtype == torch.float32 and rewards[0, 0] == torch.tensor(
        0.3, dtype=torch.float32
    )


def test_an_ema_of_bfloat16_weights_keeps_steps_below_bfloat16_resolution():
    layer = torch.nn.Linear(3, 2, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    snapshot = WeightSnapshot(layer, ["weight"])
    with torch.no_grad():
        layer.weight.fill_(1.0 + 2**-7)  # the next bfloat16 after 1
    snapshot.ema_update(decay=0.1)
    value = snapshot.values["weight"]
    assert value.dtype == torch.float32 and torch.allclose(
        value, torch.full_like(value, 1 + 0.1 * 2**-7)
    )
    with snapshot.swapped_in():
        assert layer.weight.dtype == torch.bfloat16 and bool((layer.weight == 1.0).all())
    assert bool((layer.weight == 1.0 + 2**-7).all())


@pytest.mark.slow
def test_bf16_mixed_trains_float32_weights_without_the_warning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = fit_tiny("vpd", "bf16-mixed")
    assert not [w for w in caught if "float32 copy" in str(w.message)]
    assert cli.trainer.global_step == 2
    assert {p.dtype for p in cli.model.policy.model.parameters()} == {torch.float32}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_warned_threshold_is_where_an_adam_step_rounds_away(dtype):
    lr = 1e-4
    groups = [{"params": [torch.nn.Parameter(torch.zeros(3, dtype=dtype))], "lr": lr}]
    message = half_precision_update_warning(groups, "true")
    threshold = lr * HALF_MANTISSA_STEPS[dtype]
    assert f"larger than about {threshold:.2g}" in message
    # AdamW's first step moves every weight by exactly lr
    weights = torch.tensor([threshold * 4, threshold / 4, -threshold * 4], dtype=dtype)
    weight = torch.nn.Parameter(weights.clone())
    weight.grad = torch.ones_like(weight)
    torch.optim.AdamW([weight], lr=lr, weight_decay=0.0).step()
    assert (weight.detach() != weights).tolist() == [False, True, False]


def test_weights_two_optimizers_share_are_counted_once():
    shared = torch.nn.Parameter(torch.zeros(5, dtype=torch.bfloat16))
    groups = [{"params": [shared], "lr": 1e-5}, {"params": [shared], "lr": 1e-4}]
    message = half_precision_update_warning(groups, "bf16-true")
    assert "optimizers' 5 parameters" in message and "lr = 1e-05" in message


def test_no_warning_for_float32_or_frozen_half_weights():
    frozen = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16), requires_grad=False)
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2)), frozen], "lr": 1e-5}]
    assert half_precision_update_warning(groups, "bf16-mixed") is None
