"""The method comparison end to end on the tiny model (calibration, plan, baseline, every arm and
seed, summary, plot, report) and its decision rules on hand-made data."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from vpd_lightning.rollout.sampling import Attempts
from vpd_lightning.tasks import Verdict

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def import_benchmark(monkeypatch, name: str):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module(name)


@pytest.fixture
def compare(monkeypatch):
    return import_benchmark(monkeypatch, "compare_methods")


@pytest.fixture
def design(monkeypatch):
    return import_benchmark(monkeypatch, "study_design")


@pytest.fixture
def study_summary(monkeypatch):
    return import_benchmark(monkeypatch, "study_summary")


@pytest.fixture
def gate(monkeypatch):
    return import_benchmark(monkeypatch, "gate")


def test_compare_methods_calibrates_plans_then_runs_every_arm_and_seed(
    tmp_path, monkeypatch, design
):
    output = tmp_path / "compare-cpu.json"
    command = [sys.executable, str(BENCHMARKS / "compare_methods.py"), "--model"]
    command += ["builtin:tiny-random", "--steps", "3", "--val-size", "4", "--probe-size", "2"]
    command += ["--seeds", "0", "1", "--secondary-seeds", "0", "--calibration-prompts", "2"]
    command += ["--accuracy-band", "0", "1", "--finish-target", "0", "--estep-every", "2"]
    command += ["--no-gate", "--output", str(output), "--calibrate", "--run"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)  # shared CPUs
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(output.read_text())

    assert result["calibration"]["choice"]["max_new_tokens"] == 48  # the smallest cap qualifies
    setup = result["plan"]["setup"]
    assert setup["task"] == result["calibration"]["choice"]["task"]
    assert "vpd - vpd-no-estep" in result["plan"]["primary_endpoint"]
    assert result["gate"]["skipped"].startswith("--no-gate")
    assert result["plan"]["power"]["seeds"] == 2 and result["plan"]["sizing"]["expected_minutes"]
    expected = {(a, s) for a in design.PRIMARY for s in (0, 1)}
    expected |= {(a, 0) for a in ("vpd-adapter", "sdpo", "grpo")}
    assert {(r["arm"], r["seed"]) for r in result["runs"]} == expected
    for run in result["runs"]:
        assert run["steps"] == 3 and len(run["student"]["accuracy"]) == 4
        assert sorted(run["teacher_margin_curve"], key=int) == ["0", "3"]
        assert [row["step"] for row in run["train_curve"]] == [1, 2, 3]
    for arm in ("vpd", "vpd-adapter"):  # the E-step after step 2, none on the last step
        for r in (r for r in result["runs"] if r["arm"] == arm):
            assert [row["step"] for row in r["train_curve"] if "estep/loss" in row] == [2]
    no_estep = [r for r in result["runs"] if r["arm"] == "vpd-no-estep"]
    assert all("estep/loss" not in row for r in no_estep for row in r["train_curve"])
    for d in result["summary"]["differences"]:  # the plot's dots: one paired value per seed
        assert len(d["seed_differences"]) == len(d["seeds"])
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
    assert "vpd − vpd-no-estep over 2 seeds, student accuracy:" in section


def test_vpd_no_estep_is_vpd_with_only_the_estep_off(compare, design):
    setup = design.Setup(
        model="builtin:tiny-random", task={"num_ops": 1, "max_operand": 5}, max_new_tokens=8
    )
    task = setup.arithmetic()
    vpd, control = (compare.build_module(setup, arm, 0, task) for arm in ("vpd", "vpd-no-estep"))
    assert vpd.opts.estep.every == setup.estep_every and control.opts.estep.every == 0
    differing = {
        k for k in vpd.hparams if k != "estep" and str(vpd.hparams[k]) != str(control.hparams[k])
    }
    assert differing <= {"student_optimizer"}  # a lambda each: same lr, different object
    adapter = compare.build_module(setup, "vpd-adapter", 0, task)
    differing = {k for k in vpd.hparams if str(vpd.hparams[k]) != str(adapter.hparams[k])}
    assert differing <= {"student_optimizer", "teacher_mode"}
    assert adapter.hparams["teacher_mode"] == "adapter"
    grpo, sdpo = (compare.build_module(setup, arm, 0, task) for arm in ("grpo", "sdpo"))
    assert not grpo.opts.grpo.normalize_std  # the paper's GRPO baseline
    assert sdpo.feedback_source == "sibling_and_feedback" and sdpo.opts.sdpo.teacher == "ema"
    sibling = compare.build_module(dataclasses.replace(setup, context="sibling"), "vpd", 0, task)
    assert sibling.feedback_source == "sibling"


def test_calibration_picks_the_smallest_cap_then_the_accuracy_nearest_the_band_middle(design):
    rule = design.Calibration(caps=[48, 96], accuracy_band=(0.3, 0.6), finish_target=0.95)

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
    assert design.choose(rows, rule) == {
        "task": "mid",
        "max_new_tokens": 96,
        "finished": 0.96,
        "accuracy": 0.5,
    }
    with pytest.raises(SystemExit, match="no candidate difficulty"):
        design.choose(rows[:1], rule)


def test_paired_items_pair_a_finished_wrong_attempt_with_a_right_one(gate):
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
    (item,) = gate.paired_items(attempts, size=5)  # a: only cut off; c: never right
    assert item["record"] == {"id": "b"} and item["wrong_ids"] == [20]
    assert item["right_ids"] == [21] and item["feedback"] == "too high"


def test_intervals_are_t_intervals_across_seeds_and_paired_within_them(design, study_summary):
    run = {"student": {"accuracy": [], "bank_margin": []}, "teacher": {"self_fix": []}}
    run["teacher"] |= {f"repair_{f}": [] for f in design.FEEDBACKS}

    def arm_run(arm, seed, accuracy):
        curve = {"3": {f: [] for f in design.FEEDBACKS}}
        student = {"accuracy": accuracy, "bank_margin": [0.0, 0.0]}
        return {**run, "arm": arm, "seed": seed, "student": student, "teacher_margin_curve": curve}

    noise = [[0.2, 0.6], [0.5, 0.1], [0.9, 0.3], [0.4, 0.4]]  # seed x prompt
    runs = [arm_run("vpd-no-estep", s, row) for s, row in enumerate(noise)]
    runs += [arm_run("vpd", s, [x + 0.1 for x in row]) for s, row in enumerate(noise)]
    runs.append(arm_run("sdpo", 0, [0.0, 0.0]))  # secondary arm: one seed
    setup = design.Setup(
        model="m", task={}, max_new_tokens=8, steps=3, estep_every=2, secondary_seeds=[0]
    )
    base = {"student": runs[0]["student"], "teacher": run["teacher"],
            "teacher_margin": runs[0]["teacher_margin_curve"]["3"]}  # fmt: skip
    summary = study_summary.summarize(setup, base, runs)
    primary = next(d for d in summary["differences"]
                   if (d["a"], d["b"]) == design.PRIMARY and d["measure"] == "student_accuracy")  # fmt: skip
    assert primary["difference"] == pytest.approx(0.1)  # paired: the shared noise cancels
    assert primary["ci95"] == pytest.approx([0.1, 0.1]) and primary["seeds"] == [0, 1, 2, 3]
    control = summary["arms"]["vpd-no-estep"]["student_accuracy"]
    means = [0.4, 0.3, 0.6, 0.4]
    half = 3.182446 * statistics.stdev(means) / 2  # t(0.975, 3 df) * sd / sqrt(4)
    assert control["ci95"] == pytest.approx([0.425 - half, 0.425 + half], abs=1e-5)
    assert len(control["within_seed_ci95"]) == 4
    versus_sdpo = [d for d in summary["differences"] if d["b"] == "sdpo"]
    assert versus_sdpo and all(d["seeds"] == [0] for d in versus_sdpo)
    assert all(math.isnan(x) for x in versus_sdpo[0]["ci95"])  # one seed: no interval claimed

    # The paired difference is 0.1 in every seed: a zero-width interval that measures no spread
    # shows nothing, in the summary, the table and the reading alike.
    assert primary["seeds_tie"] and not primary["excludes_0"]
    result = {"summary": summary, "plan": {"setup": {"steps": 3}}}
    row = next(line for line in study_summary.markdown_tables(result).splitlines()
               if line.startswith("| vpd − vpd-no-estep"))  # fmt: skip
    assert "+0.100 [+0.100, +0.100]†" in row and "**" not in row
    report = importlib.import_module("report")  # on the path through the study_summary fixture
    (said,) = [line for line in report.reading(result)
               if "vpd − vpd-no-estep over 4 seeds, student accuracy" in line]  # fmt: skip
    assert said and "the seeds tie exactly" in said


def test_the_last_training_step_is_never_an_estep(design):
    with pytest.raises(ValueError, match=r"steps = 20 is a multiple of estep_every = 4: the last"):
        design.Setup(model="m", task={}, max_new_tokens=8, steps=20, estep_every=4)
    assert design.Setup(model="m", task={}, max_new_tokens=8).steps == 21
    passive = ["grpo", "sdpo", "vpd-no-estep"]  # no trained teacher: no E-step to avoid
    design.Setup(model="m", task={}, max_new_tokens=8, steps=20, estep_every=4, arms=passive)
    with pytest.raises(ValueError, match="secondary_seeds"):
        design.Setup(model="m", task={}, max_new_tokens=8, secondary_seeds=[7])


def test_minimum_detectable_effect_has_its_power_and_comes_from_the_previous_study(design):
    import power

    assert power.t_quantile(0.975, 3) == pytest.approx(3.182446, abs=1e-5)  # tables
    assert power.t_quantile(0.8, 3) == pytest.approx(0.978472, abs=1e-5)
    assert power.t_quantile(0.025, 10) == pytest.approx(-2.228139, abs=1e-5)
    assert power.chi2_quantile(0.2, 2) == pytest.approx(-2 * math.log(0.8), abs=1e-6)
    assert power.chi2_quantile(0.05, 3) == pytest.approx(0.351846, abs=1e-5)
    mde = power.minimum_detectable_effect(1.0, 4)
    rng = random.Random(0)  # a true effect of mde is found about 80% of the time
    found = sum(
        power.t_interval([rng.gauss(mde, 1.0) for _ in range(4)])[0] > 0 for _ in range(4000)
    )
    assert 0.76 < found / 4000 < 0.84
    assert power.minimum_detectable_effect(1.0, 8) < mde  # more seeds, smaller effects

    previous = json.loads((BENCHMARKS / "results" / "previous-study-cpu.json").read_text())
    setup = design.Setup(model="m", task={}, max_new_tokens=8)
    plan = design.power_plan(setup, previous)
    assert len(plan["seed_differences"]) >= 3  # the committed study's primary pair
    assert plan["sd_upper_80"] > plan["sd"] and plan["mde"] > plan["mde_at_sd"]
    assert plan["mde"] == pytest.approx(power.minimum_detectable_effect(plan["sd_upper_80"], 4))
    assert "pilot" in design.power_plan(setup, None)["note"]


def test_gate_passes_only_a_context_that_beats_the_student_and_its_shuffled_control(gate):
    n = 10
    rates = {"student": [0.0] * n, "binary": [0.5] * n}
    rates |= {"diagnostic": [0.5] * n, "shuffled_diagnostic": [0.5] * n}  # reads no content
    rates |= {"sibling": [1.0] * n, "shuffled_sibling": [0.2] * n}
    rates |= {"reference": [0.05] * n, "shuffled_reference": [0.0] * n}  # below the margin
    decision = gate.decide(rates, margin=0.1)
    assert decision["passed"] == ["sibling"] and decision["chosen"] == "sibling"
    assert not decision["contexts"]["binary"]["passes"]  # its control is itself
    assert decision["contexts"]["diagnostic"]["over_student"]["mean"] == pytest.approx(0.5)
    rates["sibling"] = [0.2] * n
    refused = gate.decide(rates, margin=0.1)
    assert refused["chosen"] is None and refused["verdict"].startswith("stop: no context")


def test_the_study_stops_at_the_gate_when_the_model_cannot_use_any_context(tmp_path, monkeypatch):
    """The tiny random model never answers right, so no held-out prompt has a right and a wrong
    attempt: the gate says this model cannot test the method, nothing trains, and the report says
    so with the plan that was not run."""
    output = tmp_path / "compare-cpu.json"
    command = [sys.executable, str(BENCHMARKS / "compare_methods.py"), "--model"]
    command += ["builtin:tiny-random", "--val-size", "4", "--calibration-prompts", "2"]
    command += ["--accuracy-band", "0", "1", "--finish-target", "0", "--steps", "3"]
    command += ["--estep-every", "2", "--output", str(output), "--calibrate", "--run"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "the study stops at the gate" in done.stderr
    assert "this model cannot test the method" in done.stderr
    result = json.loads(output.read_text())
    assert set(result) == {"calibration", "gate", "plan"}  # no baseline, no runs
    assert result["plan"]["stopped_at_gate"] == result["gate"]["verdict"]
    assert result["gate"]["chosen"] is None and result["gate"]["items"] == 0
    assert "load_average_1_5_15" in result["gate"]["machine"]

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    report = importlib.import_module("report")
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    section = report.render()
    assert "Does training the teacher help? Stopped at the gate (cpu)" in section
    assert "this model cannot test the method" in section and "nothing was trained" in section


def test_the_report_says_which_context_vpd_trained_with_and_what_the_probes_measured(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    report = importlib.import_module("report")
    study = json.loads((BENCHMARKS / "results/previous-study-cpu.json").read_text())
    diagnostic = "\n".join(report.compare_section(study, "cpu"))
    assert "vpd's teacher shown the verifier's feedback on the attempt" in diagnostic
    assert (
        "summed over tokens" in diagnostic and "context the vpd arms train with" not in diagnostic
    )
    assert "{'num_ops'" not in diagnostic  # the task in words: "1 operation of +-, operands up..."
    study["plan"]["setup"]["context"] = "sibling"
    sibling = "\n".join(report.compare_section(study, "cpu"))
    assert "vpd's teacher shown a right sibling attempt" in sibling
    assert "not the sibling context the vpd arms train with" in sibling


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


def test_resume_refuses_a_changed_plan_instead_of_discarding_the_runs(design, tmp_path):
    plan = {"setup": {"steps": 20, "lr": 5e-5}, "primary_endpoint": "accuracy"}
    assert design.plan_changes(plan, json.loads(json.dumps(plan))) == []
    changed = {**plan, "setup": {"steps": 21, "lr": 5e-5}, "primary_endpoint": "logp"}
    assert design.plan_changes(plan, changed) == ["setup.steps", "primary_endpoint"]

    # the committed study, resumed with one option changed: refused, and the file kept as it was
    output = tmp_path / "compare.json"
    before = (BENCHMARKS / "results" / "previous-study-cpu.json").read_text()
    output.write_text(before)
    command = [sys.executable, str(BENCHMARKS / "compare_methods.py"), "--steps", "21"]
    done = subprocess.run(
        [*command, "--output", str(output), "--resume"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0
    assert "differs from this invocation's in setup." in done.stderr
    assert " setup.steps," in done.stderr
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


def test_gate_samples_every_condition_for_every_item(compare, design, gate):
    """repair_rates on the tiny model: the student alone, each context and each shuffled control
    (only the plumbing; the tiny model's rates mean nothing)."""
    setup = design.Setup(
        model="builtin:tiny-random", task={"num_ops": 1, "max_operand": 5}, max_new_tokens=4
    )
    task = setup.arithmetic()
    module = compare.build_module(setup, "vpd", 0, task)
    items = [
        {"record": r, "wrong_text": "1 + 1 = 3", "right_text": "1 + 1 = 2", "feedback": "Too high."}
        for r in task.records("test")[:2]
    ]
    budget = {"max_new_tokens": 4, "max_context_tokens": 16}
    rates = gate.repair_rates(module, task, items, gate.GateRule(samples=1), budget, seed=0)
    expected = {"student", *gate.CONTEXTS, *(f"shuffled_{k}" for k in gate.SHUFFLED)}
    assert set(rates) == expected and all(len(v) == 2 for v in rates.values())
    assert set(gate.decide(rates, 0.1)["contexts"]) == set(gate.CONTEXTS)
