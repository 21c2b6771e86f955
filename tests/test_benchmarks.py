"""The method comparison end to end on the tiny model (calibration, plan, baseline, every arm and
seed, summary, plot, report) and its decision rules on hand-made data."""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from vpd_lightning.rollout.sampling import Attempts
from vpd_lightning.tasks import Verdict

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def compare(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("compare_methods")


def test_compare_methods_calibrates_plans_then_runs_every_arm_and_seed(tmp_path, monkeypatch):
    output = tmp_path / "compare-cpu.json"
    command = [sys.executable, str(BENCHMARKS / "compare_methods.py"), "--model"]
    command += ["builtin:tiny-random", "--steps", "2", "--val-size", "4", "--probe-size", "2"]
    command += ["--seeds", "0", "1", "--calibration-prompts", "2", "--accuracy-band", "0", "1"]
    command += [
        "--finish-target",
        "0",
        "--estep-every",
        "1",
        "--output",
        str(output),
        "--calibrate",
        "--run",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(output.read_text())

    assert result["calibration"]["choice"]["max_new_tokens"] == 48  # the smallest cap qualifies
    setup = result["plan"]["setup"]
    assert setup["task"] == result["calibration"]["choice"]["task"]
    assert "vpd - vpd-no-estep" in result["plan"]["primary_endpoint"]
    arms = ["grpo", "sdpo", "vpd-no-estep", "vpd"]
    assert {(r["arm"], r["seed"]) for r in result["runs"]} == {(a, s) for a in arms for s in (0, 1)}
    for run in result["runs"]:
        assert run["steps"] == 2 and len(run["student"]["accuracy"]) == 4
        assert sorted(run["teacher_margin_curve"], key=int) == ["0", "2"]
        assert [row["step"] for row in run["train_curve"]] == [1, 2]
    vpd_runs = [r for r in result["runs"] if r["arm"] == "vpd"]
    assert all("estep/loss" in row for r in vpd_runs for row in r["train_curve"])
    no_estep = [r for r in result["runs"] if r["arm"] == "vpd-no-estep"]
    assert all("estep/loss" not in row for r in no_estep for row in r["train_curve"])
    pairs = {(d["a"], d["b"]) for d in result["summary"]["differences"]}
    assert {("vpd", "vpd-no-estep"), ("vpd", "sdpo"), ("vpd", "grpo")} <= pairs
    accuracy = result["summary"]["arms"]["vpd"]["student_accuracy"]
    assert accuracy["ci95"][0] <= accuracy["mean"] <= accuracy["ci95"][1]
    assert output.with_suffix(".png").stat().st_size > 10_000

    # --resume with the same plan keeps every run and reruns none.
    again = [c for c in command if c not in ("--calibrate", "--run")] + ["--resume"]
    rerun = subprocess.run(again, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert " seed=" not in rerun.stdout
    assert json.loads(output.read_text())["runs"] == result["runs"]

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    report = importlib.import_module("report")
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    section = report.render()
    assert "| vpd − vpd-no-estep |" in section and "Primary endpoint" in section
    assert "vpd − vpd-no-estep, student accuracy:" in section


def test_vpd_no_estep_is_vpd_with_only_the_estep_off(compare):
    setup = compare.Setup(
        model="builtin:tiny-random", task={"num_ops": 1, "max_operand": 5}, max_new_tokens=8
    )
    task = setup.arithmetic()
    vpd, control = (compare.build_module(setup, arm, 0, task) for arm in ("vpd", "vpd-no-estep"))
    assert vpd.opts.estep.every == setup.estep_every and control.opts.estep.every == 0
    differing = {
        k for k in vpd.hparams if k != "estep" and str(vpd.hparams[k]) != str(control.hparams[k])
    }
    assert differing <= {"student_optimizer"}  # a lambda each: same lr, different object


def test_calibration_picks_the_smallest_cap_then_the_accuracy_nearest_the_band_middle(compare):
    rule = compare.Calibration(caps=[48, 96], accuracy_band=(0.3, 0.6), finish_target=0.95)

    def row(task, at48, at96):
        return {
            "task": task,
            "per_cap": {
                "48": dict(zip(("finished", "accuracy"), at48, strict=True)),
                "96": dict(zip(("finished", "accuracy"), at96, strict=True)),
            },
        }

    rows = [
        row("easy", (0.97, 0.8), (1.0, 0.85)),
        row("mid", (0.7, 0.3), (0.96, 0.5)),
        row("hard", (0.99, 0.1), (1.0, 0.35)),
    ]
    assert compare.choose(rows, rule) == {
        "task": "mid",
        "max_new_tokens": 96,
        "finished": 0.96,
        "accuracy": 0.5,
    }
    with pytest.raises(SystemExit, match="no candidate difficulty"):
        compare.choose(rows[:1], rule)


def test_probe_items_pair_a_finished_wrong_attempt_with_a_right_one(compare):
    wrong, right = Verdict(0.0, "too high", {}), Verdict(1.0, "Correct", {})
    cut = Verdict(0.0, "cut off", {"truncated": True})
    attempts = Attempts(
        records=[{"id": "a"}, {"id": "b"}, {"id": "c"}],
        prompt_ids=[[1], [2], [3]],
        completion_ids=[[10], [11], [20], [21], [30], [31]],
        texts=["a0", "a1", "b0", "b1", "c0", "c1"],
        verdicts=[cut, right, wrong, right, wrong, wrong],
        n=2,
    )
    (item,) = compare.probe_items(attempts, size=5)  # a: only cut off; c: never right
    assert item["record"] == {"id": "b"} and item["wrong_ids"] == [20]
    assert item["right_ids"] == [21] and item["feedback"] == "too high"


def test_bootstrap_is_paired_over_seeds_and_items(compare):
    assert compare.bootstrap([[1.0] * 20, [1.0] * 20], samples=200) == [1.0, 1.0]
    noisy = [[float(i % 2) for i in range(40)], [float(i % 3 == 0) for i in range(40)]]
    shifted = [[x + 0.1 for x in row] for row in noisy]
    low, high = compare.bootstrap(shifted, noisy, samples=400)
    assert low == pytest.approx(0.1) and high == pytest.approx(0.1)  # paired: the noise cancels
    low, high = compare.bootstrap([noisy[0]], samples=400)
    assert 0.3 < low < 0.5 < high < 0.7  # item sampling alone: about 0.5 +- 0.15
    low, high = compare.bootstrap([[1.0] * 40, [0.0] * 40], samples=400)
    assert low == 0.0 and high == 1.0  # seeds disagree completely: the interval must see it
    assert all(math.isnan(x) for x in compare.bootstrap([[]]))


def test_floor_times_the_engine_and_its_forwards_against_their_floors(tmp_path):
    output = tmp_path / "floor.json"
    command = [sys.executable, str(BENCHMARKS / "floor.py"), "--model", "builtin:tiny-random"]
    done = subprocess.run(
        [*command, "--output", str(output)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(output.read_text())
    rollout, update = report["rollout"], report["update"]
    assert 0 < rollout["in_linears_s"] < rollout["in_forwards_s"] < rollout["seconds"]
    assert rollout["linear_weight_bytes_per_s"] > 0
    assert rollout["floor_s"] > 0 and update["forward_floor_s"] > 0
    # one prefill, then one forward per sampled token but the last
    assert 1 < rollout["forwards"] <= report["setup"]["max_new_tokens"]
    assert update["real_tokens"] <= update["padded_tokens"]
    assert "| rollout, whole engine |" in done.stdout


def test_resume_refuses_a_changed_plan_instead_of_discarding_the_runs(compare, tmp_path):
    plan = {"setup": {"steps": 20, "lr": 5e-5}, "primary_endpoint": "accuracy"}
    assert compare.plan_changes(plan, json.loads(json.dumps(plan))) == []
    changed = {**plan, "setup": {"steps": 21, "lr": 5e-5}, "primary_endpoint": "logp"}
    assert compare.plan_changes(plan, changed) == ["setup.steps", "primary_endpoint"]

    # the committed study, resumed with one option changed: refused, and the file kept as it was
    output = tmp_path / "compare.json"
    before = (BENCHMARKS / "results" / "compare-cpu.json").read_text()
    output.write_text(before)
    command = [sys.executable, str(BENCHMARKS / "compare_methods.py"), "--steps", "21"]
    done = subprocess.run(
        [*command, "--output", str(output), "--resume"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0
    assert "differs from this invocation's in setup.steps," in done.stderr
    assert output.read_text() == before


def test_train_step_compare_runs_each_project_row_at_each_precision_and_trl_once(tmp_path):
    output = tmp_path / "steps.json"
    command = [sys.executable, str(BENCHMARKS / "train_step.py"), "--compare", "vpd:cached"]
    command += ["trl-grpo", "--precisions", "32-true", "bf16-true", "--models"]
    command += ["builtin:tiny-random", "--steps", "1", "--warmup", "0", "--max-new-tokens", "8"]
    done = subprocess.run(
        [*command, "--output", str(output)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(output.read_text())["results"]
    assert [(r["name"], r.get("precision")) for r in rows] == [
        ("vpd (cached)", "32-true"),
        ("vpd (cached, bf16-true)", "bf16-true"),
        ("trl-grpo", None),
    ]
    assert all(r["step_s"] > 0 and r["rollout_s"] > 0 for r in rows)
