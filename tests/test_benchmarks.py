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
    command += ["--model", "builtin:tiny-random", "--steps", "2", "--val-size", "6"]
    command += ["--lrs", "1e-3", "1e-2", "--seeds", "0", "1", "--output", str(output)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(output.read_text())

    runs = {(r["method"], r["lr"], r["seed"]) for r in result["runs"]}
    chosen = result["lr_sweep"]["chosen"]
    swept = ("grpo", "sdpo", "vpd")
    assert set(chosen) == {*swept, "vpd-adapter", "vpd-fixed-prior"}
    assert chosen["vpd-fixed-prior"] == chosen["vpd-adapter"] == chosen["vpd"]
    assert runs == {(m, lr, 0) for m in swept for lr in (1e-3, 1e-2)} | {
        (m, chosen[m], s) for m in swept for s in (0, 1)
    } | {("vpd-adapter", chosen["vpd"], 0), ("vpd-fixed-prior", chosen["vpd"], 0)}
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    compare = importlib.import_module("compare_methods")
    for method in swept:  # the chosen lr is the best late train reward of the sweep seed
        sweep = [r for r in result["runs"] if r["method"] == method and r["seed"] == 0]
        best = max(compare.late_reward(r) for r in sweep)
        assert compare.late_reward(next(r for r in sweep if r["lr"] == chosen[method])) == best
    for run in result["runs"]:
        assert run["steps"] == 2 and run["held_out_size"] == len(run["held_out"]) == 6
        assert [t["step"] for t in run["train_curve"]] == [1, 2]
    rows = {row["method"]: row for row in result["summary"]["methods"]}
    assert rows["vpd"]["seeds"] == [0, 1] and rows["vpd-adapter"]["seeds"] == [0]
    for row in rows.values():
        low, high = row["ci95"]
        assert low <= row["mean"] <= high and row["held_out_size"] == 6 and row["steps"] == 2
    pairs = {(d["a"], d["b"]) for d in result["summary"]["differences"]}
    assert {("vpd", "grpo"), ("vpd", "sdpo"), ("vpd-adapter", "vpd")} <= pairs
    assert result["rollout_budget"] == 2 * 4 * 4
    probe = result["feedback_probe"]
    assert probe["held_out_size"] == 6 and 0 <= probe["repaired"] <= probe["student_wrong"] <= 6
    assert output.with_suffix(".png").stat().st_size > 10_000

    report = importlib.import_module("report")
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    section = report.render()
    assert "| vpd-fixed-prior |" in section and "**chosen**" in section
    assert "| vpd − sdpo |" in section and "Feedback probe, before training" in section


def test_bootstrap_resamples_prompts_and_seeds(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    compare = importlib.import_module("compare_methods")
    assert compare.bootstrap([[1.0] * 20, [1.0] * 20], samples=200) == [1.0, 1.0]
    same = [[float(i % 2) for i in range(40)]]
    low, high = compare.bootstrap(same, same, samples=400)
    assert low == high == 0.0  # paired over prompts: a method minus itself is exactly 0
    low, high = compare.bootstrap(same, samples=400)
    assert 0.3 < low < 0.5 < high < 0.7  # prompt sampling alone: about 0.5 +- 0.15
    split = [[1.0] * 40, [0.0] * 40]  # seeds disagree completely: the interval must see it
    low, high = compare.bootstrap(split, samples=400)
    assert low == 0.0 and high == 1.0
