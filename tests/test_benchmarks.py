"""The method comparison end to end on the tiny model: sweep, lr choice, seeds, JSON, plot, report."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_compare_methods_sweeps_then_runs_every_seed_at_the_chosen_lr(tmp_path, monkeypatch):
    output = tmp_path / "compare-cpu.json"
    command = [sys.executable, str(BENCHMARKS / "compare_methods.py")]
    command += ["--model", "builtin:tiny-random", "--steps", "2", "--eval-every", "1"]
    command += ["--val-size", "2", "--lrs", "1e-3", "1e-2", "--seeds", "0", "1"]
    command += ["--output", str(output)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(output.read_text())

    runs = {(r["method"], r["lr"], r["seed"]) for r in result["runs"]}
    chosen = result["lr_sweep"]["chosen"]
    swept = ("grpo", "sdpo", "vpd")
    assert {(m, lr, 0) for m in swept for lr in (1e-3, 1e-2)} <= runs
    assert chosen["vpd-fixed-prior"] == chosen["vpd"]
    assert runs == {(m, lr, 0) for m in swept for lr in (1e-3, 1e-2)} | {
        (m, chosen[m], s) for m in chosen for s in (0, 1)
    }
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    compare = importlib.import_module("compare_methods")
    for method in swept:  # the chosen lr is the best late train reward of the sweep seed
        sweep = [r for r in result["runs"] if r["method"] == method and r["seed"] == 0]
        best = max(compare.late_reward(r) for r in sweep)
        assert compare.late_reward(next(r for r in sweep if r["lr"] == chosen[method])) == best
    for row in result["summary"]:
        assert row["after"]["n"] == 2 and row["after"]["std"] is not None
        assert ("teacher_after" in row) == row["method"].startswith("vpd")
    for run in result["runs"]:
        assert [v["step"] for v in run["val_curve"]] == [0, 1, 2]
        assert [t["step"] for t in run["train_curve"]] == [1, 2]
    assert output.with_suffix(".png").stat().st_size > 10_000

    report = importlib.import_module("report")
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    section = report.render()
    assert "| vpd-fixed-prior |" in section and "**chosen**" in section
