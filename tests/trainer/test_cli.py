"""The LightningCLI app: every shipped config parses, bad keys fail, tiny.yaml trains end to end."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vpd_lightning.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "quickstart.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["method"] in {"vpd", "sdpo", "opsd", "grpo"}
    assert printed["data"]["task"]["class_path"].startswith("vpd_lightning.tasks.")


def test_unknown_config_key_is_an_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    config = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    config["model"]["estep"]["evry"] = 3
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(bad), "--print_config"])
    assert exit_info.value.code != 0
    assert "evry" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_config_trains_end_to_end_and_saves_logs_config_and_checkpoint(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vpd_lightning",
            "fit",
            "--config",
            str(ROOT / "configs/tiny.yaml"),
            "--trainer.max_steps",
            "4",
            "--trainer.val_check_interval",
            "2",
            "--trainer.enable_progress_bar",
            "false",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training finished" in result.stdout and "before" in result.stdout
    run_dir = tmp_path / "runs/tiny/version_0"
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "curves.png").stat().st_size > 10_000 and "curves:" in result.stdout
    assert list((run_dir / "checkpoints").glob("*.ckpt"))
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    logged = {k for row in rows for k, v in row.items() if v}
    expected = {
        "train/reward_mean",
        "mstep/loss",
        "estep/loss",
        "estep/delta",
        "mstep/teacher_student_kl",
        "mstep/student_entropy",
        "throughput/tokens_per_s",
        "val/mean@2",
        "val/pass@2",
        "val/teacher_repair_rate",
    }
    assert expected <= logged, expected - logged
    # tiny.yaml runs an E-step every 2 steps: E-step metrics appear on those steps only
    estep_steps = [row["step"] for row in rows if row.get("estep/loss")]
    assert estep_steps == ["2", "4"], estep_steps
