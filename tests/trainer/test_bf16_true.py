"""`trainer.precision: bf16-true`, the GPU recipes' setting, trains every method end to end.
Lightning makes bfloat16 torch's default dtype during the training step, so every float32
buffer the step creates must say so (the fused losses' gradient buffers did not, and failed)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from vpd_lightning.cli import main
from vpd_lightning.policy.snapshots import WeightSnapshot
from vpd_lightning.rollout.sampling import Attempts
from vpd_lightning.tasks import Verdict

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["vpd", "sdpo", "grpo"])
def test_bf16_true_trains_every_method(tmp_path, monkeypatch, method):
    monkeypatch.chdir(tmp_path)
    cli = main(
        ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--model.method", method]
        + ["--trainer.precision", "bf16-true", "--trainer.max_steps", "2"]
        + ["--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0"]
    )
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
