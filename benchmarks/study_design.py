"""What the method comparison fixes before it runs (`compare_methods.py` runs it): the arms and
their comparisons, how the task is calibrated, the setup every arm shares, the measures, and the
plan written before any run, with the primary endpoint's power and every part's price.

A resumed study checks its plan against this module's (`plan_changes`): changing what is decided
here between sessions is refused, so every run of one study sees one design.
"""

from __future__ import annotations

import inspect
import statistics
from dataclasses import asdict, dataclass, field

from gate import CONTEXTS, GateRule
from power import minimum_detectable_effect, sd_upper_bound

from vpd_lightning.tasks import ArithmeticTask

ARMS = ("grpo", "sdpo", "vpd-no-estep", "vpd", "vpd-adapter", "vpd-fixed-prior")


PRIMARY = ("vpd", "vpd-no-estep")


COMPARISONS = (
    PRIMARY,
    ("vpd-adapter", "vpd-no-estep"),
    ("vpd", "vpd-adapter"),
    ("vpd", "sdpo"),
    ("vpd", "grpo"),
    ("vpd-no-estep", "sdpo"),
    ("sdpo", "grpo"),
    ("vpd-fixed-prior", "vpd"),
)


CONTEXT_SOURCE = {"diagnostic": "verifier", "binary": "verifier", "sibling": "sibling"}
"""The gate's context -> vpd's `feedback_source` (the task's feedback level is the context's
name for the verifier ones); `reference` is its own source."""


FEEDBACKS = ("diagnostic", "binary")


ALPHA, POWER = 0.05, 0.8


@dataclass
class Calibration:
    """How the task is fixed from the untrained model (training split only)."""

    candidates: list[dict] = field(
        default_factory=lambda: [
            dict(num_ops=1, max_operand=10, operations="+-", num_test=128),
            dict(num_ops=1, max_operand=20, operations="+"),
            dict(num_ops=1, max_operand=50, operations="+"),
            dict(num_ops=1, max_operand=20, operations="+-"),
            dict(num_ops=2, max_operand=5, operations="+-"),
        ]
    )
    """Difficulties tried, easiest first: ArithmeticTask keywords (a small problem space keeps
    only as many test prompts as the held-out set needs, the rest train)."""
    caps: list[int] = field(default_factory=lambda: [48, 64, 80, 96, 128, 160])
    """Candidate `max_new_tokens`; the largest is the cap the calibration samples with."""
    prompts: int = 48
    samples: int = 4
    temperature: float = 0.6
    finish_target: float = 0.95
    """Fraction of the untrained model's responses that must finish within the chosen cap."""
    accuracy_band: tuple[float, float] = (0.3, 0.6)


def choose(rows: list[dict], calibration: Calibration) -> dict:
    """The smallest cap at which every candidate in the band finishes >= the target, and the
    candidate whose accuracy there is nearest the band's middle; refuses when none qualifies."""
    low, high = calibration.accuracy_band
    for cap in sorted(calibration.caps):
        ok = [
            row
            for row in rows
            if row["per_cap"][str(cap)]["finished"] >= calibration.finish_target
            and low <= row["per_cap"][str(cap)]["accuracy"] <= high
        ]
        if ok:
            best = min(ok, key=lambda r: abs(r["per_cap"][str(cap)]["accuracy"] - (low + high) / 2))
            return {"task": best["task"], "max_new_tokens": cap, **best["per_cap"][str(cap)]}
    raise SystemExit(
        f"calibration: no candidate difficulty finishes {calibration.finish_target:.0%} of its "
        f"responses with accuracy in [{low}, {high}] at any cap {calibration.caps}; add "
        "candidates or larger caps (the rows above say what each gave)"
    )


@dataclass
class Setup:
    """Everything the arms share, fixed before any run; recorded in the JSON as the plan."""

    model: str
    task: dict
    """ArithmeticTask keywords, from the calibration."""
    max_new_tokens: int
    """Rollout and evaluation cap, from the calibration."""
    steps: int = 21
    """Not a multiple of `estep_every`: the last step is an M-step (see the module docstring)."""
    prompts_per_step: int = 3
    """With `num_generations`: 12 rollouts a step, sized so the whole run fits the CPU budget."""
    num_generations: int = 4
    temperature: float = 0.8
    """Rollout temperature (training)."""
    lr: float = 5e-5
    """One learning rate for every arm, student and teacher (quickstart's, which gave a held-out
    gain in 12 steps); fixed before any run."""
    lora_r: int = 16
    lora_alpha: int = 32
    estep_every: int = 4
    """vpd's E-step interval: E-steps after steps 4, 8, 12, 16 and 20, each over 4 steps'
    rollouts; step 21 is the last M-step."""
    micro_batch_size: int = 8
    max_context_tokens: int = 128
    context: str = "diagnostic"
    """The teacher context of the vpd arms, from the gate (one of `gate.CONTEXTS`)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """Seeds of the primary pair."""
    secondary_seeds: list[int] = field(default_factory=lambda: [0, 1])
    """Seeds of the other arms (each also a seed of the primary pair, so differences pair)."""
    arms: list[str] = field(
        default_factory=lambda: ["vpd-no-estep", "vpd", "vpd-adapter", "sdpo", "grpo"]
    )
    val_size: int = 128
    """Held-out prompts: the first `val_size` of the test split."""
    val_samples: int = 2
    val_temperature: float = 0.6
    probe_size: int = 32
    """Teacher probe items: held-out prompts where the untrained student had a finished wrong
    attempt and a right one (its first of each)."""
    probe_every: int = 0
    """Teacher log-margins every this many steps besides step 0 and the last; 0: only those."""
    repair_samples: int = 1
    """Samples per probe item for the repair and self-fix rates (at `val_temperature`)."""

    def __post_init__(self) -> None:
        trains_teacher = any(a.startswith("vpd") and a != "vpd-no-estep" for a in self.arms)
        if trains_teacher and self.estep_every and self.steps % self.estep_every == 0:
            raise ValueError(
                f"steps = {self.steps} is a multiple of estep_every = {self.estep_every}: the last "
                "training step would be an E-step, changing the student (shared weights) or the "
                "teacher just before evaluation with no M-step after it; use steps = "
                f"{self.steps + 1} (or one that leaves a remainder)"
            )
        if self.context not in CONTEXTS:
            raise ValueError(f"context = {self.context!r}: must be one of {CONTEXTS}")
        missing = sorted(set(self.secondary_seeds) - set(self.seeds))
        if missing:
            raise ValueError(
                f"secondary_seeds {missing} are not seeds of the primary pair {self.seeds}: the "
                "other arms' differences to vpd would have no paired run; use a subset"
            )

    def seeds_of(self, arm: str) -> list[int]:
        return self.seeds if arm in PRIMARY else self.secondary_seeds

    @property
    def primary_endpoint(self) -> str:
        return (
            f"student accuracy (mean over {self.val_samples} samples at T={self.val_temperature}) "
            f"on the {self.val_size} held-out prompts after {self.steps} steps: the paired "
            f"difference vpd - vpd-no-estep over {len(self.seeds)} seeds, 95% t-interval across "
            f"seeds ({len(self.seeds) - 1} degrees of freedom; the held-out prompts are fixed)"
        )

    def arithmetic(self, feedback: str = "diagnostic") -> ArithmeticTask:
        return ArithmeticTask(**self.task, feedback=feedback, answer_format="last_number", seed=0)

    def feedback_level(self, arm: str) -> str:
        """The task's feedback: binary when vpd's context is the one-bit feedback, else
        diagnostic (sdpo and grpo keep the task's diagnostic feedback whatever the gate says)."""
        return "binary" if arm.startswith("vpd") and self.context == "binary" else "diagnostic"


MEASURES = {
    "student_accuracy": "per held-out prompt, the mean reward of its samples (cut off: 0)",
    "student_bank_margin": "per held-out prompt of the bank (the untrained model's own finished "
    "samples, with a right and a wrong one), the mean per-token log-probability of its right "
    "samples minus that of its wrong ones under the trained student, in nats per token: one fixed "
    "bank scored under every student, so the arms' values pair",
    "teacher_margin": "per probe item, log q(right attempt | x, C) / its tokens - log q(wrong "
    "attempt | x, C) / its tokens under the teacher the method distils from (grpo: its policy; "
    "sdpo: its EMA weights), C the verifier's feedback on the wrong attempt (diagnostic, or "
    "binary: 'Your answer is incorrect.'); length-normalised, in nats per token",
    "teacher_repair": "per probe item, the fraction of that teacher's samples given (x, C) that "
    "are right",
    "student_self_fix": "per probe item, the fraction of the student's samples on x alone that are "
    "right (the rate the teacher's repair is measured against)",
    "teacher_skill": "teacher_repair - student_self_fix, per probe item",
}


def task_text(task: dict) -> str:
    """ArithmeticTask keywords as words: `1 operation of +-, operands up to 10`."""
    defaults = inspect.signature(ArithmeticTask).parameters
    ops = task.get("num_ops", defaults["num_ops"].default)
    operations = task.get("operations", defaults["operations"].default)
    operand = task.get("max_operand", defaults["max_operand"].default)
    return f"{ops} operation{'s' if ops > 1 else ''} of {operations}, operands up to {operand}"


def plan_of(setup: Setup, result: dict, previous: dict | None, kept: dict | None) -> dict:
    """The plan as written before any run: setup, measures, endpoint and its power, comparisons,
    intervals, prices. A resumed study keeps its plan's power and prices (the previous study's
    file may since have been replaced by this one)."""
    return {
        "setup": asdict(setup),
        "primary_endpoint": setup.primary_endpoint,
        "measures": MEASURES,
        "comparisons": [f"{a} - {b}" for a, b in COMPARISONS],
        "intervals": "per arm and per paired difference: a 95% t-interval across seeds of the "
        "per-seed means (df = seeds - 1), and per seed a 95% t-interval over items",
        "rollout_budget_per_run": setup.steps * setup.prompts_per_step * setup.num_generations,
        "power": (kept or {}).get("power") or power_plan(setup, previous),
        "sizing": (kept or {}).get("sizing") or sizing(setup, result, previous),
    }


def plan_changes(old: dict, new: dict) -> list[str]:
    """The entries (setup options by name) in which two plans differ."""
    changed = [
        f"setup.{k}"
        for k in sorted(set(old.get("setup", {})) | set(new.get("setup", {})))
        if old.get("setup", {}).get(k) != new.get("setup", {}).get(k)
    ]
    others = (set(old) | set(new)) - {"setup"}
    return changed + sorted(k for k in others if old.get(k) != new.get(k))


def primary_seed_differences(study: dict) -> dict[int, float]:
    """Per seed, vpd's mean held-out accuracy minus vpd-no-estep's, in a study's runs."""
    means: dict[str, dict[int, float]] = {}
    for run in study.get("runs", []):
        means.setdefault(run["arm"], {})[run["seed"]] = statistics.fmean(run["student"]["accuracy"])
    a, b = (means.get(arm, {}) for arm in PRIMARY)
    return {s: a[s] - b[s] for s in sorted(set(a) & set(b))}


def power_plan(setup: Setup, previous: dict | None) -> dict:
    """The primary endpoint's minimum detectable effect at this plan's seeds, from the previous
    study's seed-to-seed spread of the same paired difference. That spread is measured on few
    seeds, so the plan uses its one-sided 80% upper confidence bound."""
    differences = primary_seed_differences(previous or {})
    if len(differences) < 3:
        return {
            "note": "no previous study with 3 or more seeds of the primary pair: run a pilot of "
            "the primary pair first and give it as --previous"
        }
    sd = statistics.stdev(differences.values())
    df, n = len(differences) - 1, len(setup.seeds)
    planning_sd = sd_upper_bound(sd, df, 0.8)
    return {
        "source": "previous study (--previous): per-seed vpd - vpd-no-estep held-out accuracy",
        "seed_differences": differences,
        "sd": sd,
        "sd_upper_80": planning_sd,
        "alpha": ALPHA,
        "power": POWER,
        "seeds": n,
        "mde_at_sd": minimum_detectable_effect(sd, n, ALPHA, POWER),
        "mde": minimum_detectable_effect(planning_sd, n, ALPHA, POWER),
        "rule": f"two-sided t-test across {n} seeds (df {n - 1}) at alpha {ALPHA}: a true "
        f"difference of at least `mde` is detected with probability about {POWER}; smaller "
        "ones may be missed, and an interval that includes 0 then says only that",
    }


def sizing(setup: Setup, result: dict, previous: dict | None) -> dict:
    """Expected minutes of every part, from the previous study's measured times (same machine
    kind): seconds per training step of each arm (vpd-adapter and vpd-fixed-prior at vpd's:
    not measured), per teacher-probe pass, per end-of-run evaluation (plus one probe pass for
    the sample bank) and for the baseline; the gate's own measured time when it has run, else
    the calibration's seconds per sampled response times the gate's responses."""
    if not previous or not previous.get("runs"):
        return {"note": "no previous study with runs to price from: give one as --previous"}
    runs = previous["runs"]

    def per_arm(key) -> dict[str, float]:
        out: dict[str, list[float]] = {}
        for r in runs:
            out.setdefault(r["arm"], []).append(key(r))
        return {arm: statistics.fmean(v) for arm, v in out.items()}

    step_s = per_arm(lambda r: r["train_seconds"] / r["steps"])
    for arm in ("vpd-adapter", "vpd-fixed-prior"):
        step_s.setdefault(arm, step_s["vpd"])
    probe_pass_s = statistics.fmean(
        r["probe_seconds"] / max(len(r["teacher_margin_curve"]) - 1, 1) for r in runs
    )
    eval_s = statistics.fmean(r["eval_seconds"] for r in runs) + probe_pass_s
    probes_per_run = (setup.steps // setup.probe_every if setup.probe_every else 0) + 1
    gate = result.get("gate") or {}
    if "seconds" in gate:
        gate_s = gate["seconds"]
    else:
        calibration, rule = result["calibration"], GateRule()
        chosen = next(
            r for r in calibration["candidates"] if r["task"] == calibration["choice"]["task"]
        )
        per_response = chosen["seconds"] / (
            calibration["rule"]["prompts"] * calibration["rule"]["samples"]
        )
        responses = setup.val_size * rule.draws + rule.items * rule.samples * 8
        gate_s = per_response * responses
    parts = {
        "gate": gate_s,
        "baseline": previous["baseline"]["seconds"] + probe_pass_s,
    }
    for arm in setup.arms:
        per_run = step_s[arm] * setup.steps + probes_per_run * probe_pass_s + eval_s
        parts[f"{arm} x {len(setup.seeds_of(arm))} seeds"] = per_run * len(setup.seeds_of(arm))
    return {
        "seconds_per_step": step_s,
        "probe_pass_seconds": probe_pass_s,
        "probes_per_run": probes_per_run,
        "eval_seconds_per_run": eval_s,
        "part_minutes": {k: v / 60 for k, v in parts.items()},
        "expected_minutes": sum(parts.values()) / 60,
    }
