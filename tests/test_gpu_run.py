"""The GPU run prepared for a round that has a GPU: benchmarks/gpu_run.sh runs as a dry run on the
CPU, and the cost model it checks is the one kernels/README.md shows, with the kernels' sizes."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vpd_kernels.fused_linear as fused_linear

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["env", "gpu-tests", "bench-h2048", "cost-model", "bench-h4096", "model-step"]


@pytest.fixture
def cost_model(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("cost_model")


def test_the_cost_model_uses_the_kernels_chunk_sizes(cost_model):
    assert cost_model.CHUNK_LOGITS == fused_linear.CHUNK_LOGITS
    assert cost_model.VOCAB_TILE == fused_linear.VOCAB_TILE


def test_the_readme_cost_table_is_the_cost_model(cost_model):
    readme = (ROOT / "kernels" / "README.md").read_text()
    begin, end = "<!-- cost-model:begin -->\n", "<!-- cost-model:end -->"
    shown = readme[readme.index(begin) + len(begin) : readme.index(end)]
    assert shown == cost_model.table(16384, 151936, [4096, 2048], cost_model.H100)


@pytest.mark.slow
def test_the_dry_run_runs_every_part(tmp_path):
    """`--dry-run`: the GPU run's code at tiny shapes on the CPU, so that the script cannot rot
    between the rare rounds that have a GPU."""
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), "--dry-run", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    parts = json.loads((tmp_path / "summary.json").read_text())["parts"]
    assert [p["part"] for p in parts] == PARTS
    failed = {
        p["part"]: (tmp_path / f"{p['part']}.log").read_text()[-2000:] for p in parts if p["rc"]
    }
    assert not failed, failed
    bench = json.loads((tmp_path / "bench-h2048.json").read_text())
    statuses = {r["method"]: r["status"] for r in bench["results"]}
    assert statuses == {"eager": "ok", "vpd_kernels": "ok", "vpd_kernels/bwd=bfloat16": "ok"}
    step = json.loads((tmp_path / "model-step.json").read_text())
    assert [r["status"] for r in step["results"]] == ["ok", "ok", "ok"]
    assert "grad_weight GEMM" in (tmp_path / "cost-model.md").read_text()
