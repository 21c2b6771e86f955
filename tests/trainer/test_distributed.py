"""DDP with two CPU processes on gloo, and strategies that cannot work rejected up front."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

from vpd_lightning.module import check_strategy

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["shared", "adapter"])
def test_ddp_two_cpu_processes_stay_in_sync_on_different_prompts(tmp_path, mode):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests/trainer/ddp_run.py"), str(tmp_path), mode],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0["step"] == rank1["step"] == 2
    assert rank0["checksum"] == pytest.approx(rank1["checksum"], rel=1e-6)
    assert not set(rank0["prompts"]) & set(rank1["prompts"])


@pytest.mark.parametrize("strategy", [FSDPStrategy(), ModelParallelStrategy()])
def test_strategies_without_two_manual_optimizers_are_rejected(strategy):
    with pytest.raises(ValueError, match=r"Use trainer\.strategy: ddp"):
        check_strategy(strategy)


def test_ddp_strategy_is_accepted():
    check_strategy(DDPStrategy())
