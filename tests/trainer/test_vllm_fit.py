"""`fit` with `model.rollout.engine: vllm` on two CPU processes (DDP, one engine per process):
training, validation and the teacher's repair probe all sample with vLLM, on weights pushed after
every step, and the sampler's log-prob gap to the trainer is logged. (The README's quickstart
command with the vllm engine runs in test_vllm_engine.py, on that module's vLLM instance.)"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vpd_lightning.policy.tiny import build_tiny_model, build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    "VLLM_CPU_KVCACHE_SPACE": "1",
}


@pytest.mark.slow
def test_fit_on_two_processes_with_one_vllm_engine_each(tmp_path):
    # vLLM's CPU attention needs a head size of 32 or more: the tiny model with 2 heads of 32
    model = tmp_path / "tiny-head32"
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(len(tokenizer), num_heads=2, num_kv_heads=1).save_pretrained(model)
    tokenizer.save_pretrained(model)
    command = [sys.executable, "-m", "vpd_lightning", "fit"]
    command += ["--config", str(ROOT / "configs/tiny.yaml"), "--model.model", str(model)]
    command += ["--trainer.accelerator", "cpu", "--trainer.devices", "2"]
    command += ["--trainer.strategy", "ddp", "--trainer.max_steps", "2"]
    command += ["--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false"]
    command += ["--model.rollout.engine", "vllm"]
    scratch = tmp_path / "tmp"  # the engines' temporary config folders must not outlive them
    scratch.mkdir()
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=900,
        env={**ENV, "TMPDIR": str(scratch)},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("training finished") == 1
    assert "Traceback" not in result.stderr  # vLLM shut down before the process group ends
    # vLLM logs to stdout: its chat-template warmup, which cannot work without a tokenizer, is
    # kept from printing a traceback
    assert "Traceback" not in result.stdout and "warmup failed" not in result.stdout
    assert not list(scratch.glob("vpd-vllm-config-*"))
    rows = list(csv.DictReader((tmp_path / "runs/tiny/version_0/metrics.csv").open()))
    gaps = [float(r["rollout/sampler_logprob_gap"]) for r in rows if r.get("train/reward_mean")]
    assert len(gaps) == 2 and all(0 <= g < 1e-3 for g in gaps)  # float32 engine: equal
    assert any(r.get("val/mean@2") for r in rows)
    assert any(r.get("val/teacher_repair_rate") for r in rows)
