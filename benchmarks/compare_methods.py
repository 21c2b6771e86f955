"""Does training the teacher help? grpo, sdpo, vpd-no-estep and vpd on SmolLM2-135M-Instruct +
LoRA, arithmetic with diagnostic feedback, decided in advance (issue 23).

Phases, each written into the JSON before the next starts:
1. `calibration` (`--calibrate`): the task is fixed from the untrained model on the training split
   only: for each candidate difficulty, `samples` responses at `temperature` to `prompts` training
   prompts with a generous cap. `max_new_tokens` is the smallest candidate cap within which at
   least 95% of the responses finish; the difficulty is the candidate whose accuracy at that cap
   (a response cut off scores 0) lies in the target band, nearest its middle.
2. `plan`: arms, learning rate, seeds, steps, E-step interval, measures and the primary endpoint,
   with the run's expected duration sized from measured step times. Runs only ever read it.
3. `baseline`: the untrained student on the held-out prompts (LoRA starts as the identity, so every
   arm starts from this model) and the fixed teacher probe set drawn from its answers.
4. `runs`: every arm for every seed (the same seed gives every arm the same prompt order and
   rollout seeds), teacher probes every `probe_every` steps, the held-out measures at the end.
5. `summary`: per arm and per paired difference, the mean and its 95% bootstrap interval.

Arms differ from their neighbour in one setting: `vpd-no-estep` is `vpd` with `estep.every: 0`
(same contexts, divergence, vocabulary and teacher weights), the thesis's control; `sdpo` keeps
its reference settings (sibling solution + feedback reprompt, EMA teacher, top-100 + tail, JSD).

    .venv/bin/python benchmarks/compare_methods.py --calibrate   # phase 1 (about 5 min)
    .venv/bin/python benchmarks/compare_methods.py               # phases 2-5 (the plan's time)
    .venv/bin/python benchmarks/compare_methods.py --model builtin:tiny-random --steps 2 \
        --val-size 4 --probe-size 2 --seeds 0 --calibration-prompts 2 --accuracy-band 0 1 \
        --finish-target 0 --output /tmp/compare-smoke.json --calibrate --run

`--resume` keeps the runs already in the JSON, and refuses when its plan differs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger

from vpd_lightning.options import (
    DistillOptions,
    EStepOptions,
    LoraOptions,
    RolloutOptions,
    SamplingParams,
)
from vpd_lightning.rollout import TeacherContextBuilder
from vpd_lightning.rollout.sampling import Attempts, answer_records, sample_and_verify
from vpd_lightning.tasks import ArithmeticTask, Verdict
from vpd_lightning.tasks.arithmetic import BINARY_FEEDBACK
from vpd_lightning.trainer.data import VPDDataModule
from vpd_lightning.trainer.module import VPDModule

RESULTS = Path(__file__).parent / "results"
ARMS = ("grpo", "sdpo", "vpd-no-estep", "vpd", "vpd-fixed-prior")
COMPARISONS = (
    ("vpd", "vpd-no-estep"),
    ("vpd", "sdpo"),
    ("vpd", "grpo"),
    ("vpd-no-estep", "sdpo"),
    ("sdpo", "grpo"),
    ("vpd-fixed-prior", "vpd"),
)
TRAIN_KEYS = (
    "train/reward_mean",
    "train/truncated_fraction",
    "train/response_length",
    "mstep/teacher_student_kl",
    "estep/loss",
    "estep/margin",
    "time/rollout_s",
    "time/update_s",
)
FEEDBACKS = ("diagnostic", "binary")
BOOTSTRAP_SAMPLES = 4000


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


@dataclass
class Setup:
    """Everything the arms share, fixed before any run; recorded in the JSON as the plan."""

    model: str
    task: dict
    """ArithmeticTask keywords, from the calibration."""
    max_new_tokens: int
    """Rollout and evaluation cap, from the calibration."""
    steps: int = 20
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
    """vpd's E-step interval: 5 E-steps in 20 steps, each over 4 steps' rollouts."""
    micro_batch_size: int = 8
    max_context_tokens: int = 128
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    arms: list[str] = field(default_factory=lambda: ["grpo", "sdpo", "vpd-no-estep", "vpd"])
    val_size: int = 128
    """Held-out prompts: the first `val_size` of the test split."""
    val_samples: int = 2
    val_temperature: float = 0.6
    probe_size: int = 32
    """Teacher probe items: held-out prompts where the untrained student had a finished wrong
    attempt and a right one (its first of each)."""
    probe_every: int = 5
    """Teacher log-margins every this many steps (and at step 0)."""
    repair_samples: int = 1
    """Samples per probe item for the repair and self-fix rates (at `val_temperature`)."""

    @property
    def primary_endpoint(self) -> str:
        return (
            f"student accuracy (mean over {self.val_samples} samples at T={self.val_temperature}) "
            f"on the {self.val_size} held-out prompts after {self.steps} steps: the paired "
            "difference vpd - vpd-no-estep, 95% bootstrap interval over prompts and seeds"
        )

    def arithmetic(self, feedback: str = "diagnostic") -> ArithmeticTask:
        return ArithmeticTask(**self.task, feedback=feedback, answer_format="last_number", seed=0)


MEASURES = {
    "student_accuracy": "per held-out prompt, the mean reward of its samples (cut off: 0)",
    "student_logp_correct": "per held-out prompt, log p(reference solution | prompt) under the "
    "student, in nats per token of the reference (the task's worked steps and <answer>)",
    "teacher_margin": "per probe item, log q(right attempt | x, C) - log q(wrong attempt | x, C) "
    "under the teacher the method distils from (grpo: its policy; sdpo: its EMA weights), C the "
    "verifier's feedback on the wrong attempt (diagnostic, or binary: 'Your answer is "
    "incorrect.'); sums over tokens, in nats",
    "teacher_repair": "per probe item, the fraction of that teacher's samples given (x, C) that "
    "are right",
    "student_self_fix": "per probe item, the fraction of the student's samples on x alone that are "
    "right (the rate the teacher's repair is measured against)",
    "teacher_skill": "teacher_repair - student_self_fix, per probe item",
}


# ----------------------------------------------------------------------------- modules and runs
def build_module(setup: Setup, arm: str, seed: int, task: ArithmeticTask) -> VPDModule:
    """One arm's module; vpd's teacher optimizer is the student's (same class and lr)."""
    method = "vpd" if arm.startswith("vpd") else arm
    return VPDModule(
        model=setup.model,
        method=method,
        lora=LoraOptions(r=setup.lora_r, alpha=setup.lora_alpha),
        max_context_tokens=setup.max_context_tokens,
        rollout=RolloutOptions(
            num_generations=setup.num_generations,
            temperature=setup.temperature,
            max_new_tokens=setup.max_new_tokens,
            engine="cached",
        ),
        # SDPO's reference default is JSD(0.5); VPD's M-step is the paper's reverse KL.
        distill=DistillOptions(divergence="jsd") if method == "sdpo" else DistillOptions(),
        estep=EStepOptions(
            every=0 if arm == "vpd-no-estep" else setup.estep_every,
            prior="initial" if arm == "vpd-fixed-prior" else "student",
        ),
        micro_batch_size=setup.micro_batch_size,
        student_optimizer=lambda params: torch.optim.AdamW(params, lr=setup.lr),
        verify_workers=1,
        seed=seed,
        task=task,
    )


class StepLogger(Logger):
    """Keeps the per-step training metrics that the module sends straight to its loggers."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[int, dict] = {}

    @property
    def name(self) -> str:
        return "steps"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        return None

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        train = {k: float(v) for k, v in metrics.items() if k in TRAIN_KEYS}
        if train:
            self.rows.setdefault(int(step or 0), {}).update(train)


class TeacherProbes(pl.Callback):
    """Teacher log-margins on the probe set every `every` steps, timed apart from training."""

    def __init__(self, probe: list[dict], setup: Setup, every: int) -> None:
        self.probe, self.setup, self.every = probe, setup, every
        self.margins: dict[int, dict[str, list[float]]] = {}
        self.train_seconds: dict[int, float] = {}
        self.probe_seconds = 0.0
        self._started = 0.0
        self._train = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._train += time.perf_counter() - self._started
        step = trainer.global_step
        self.train_seconds[step] = self._train
        if step % self.every == 0 or step == trainer.max_steps:
            start = time.perf_counter()
            self.margins[step] = teacher_margins(pl_module, self.setup, self.probe)
            self.probe_seconds += time.perf_counter() - start


def run_arm(setup: Setup, arm: str, seed: int, baseline: dict, accelerator: str) -> dict:
    """Train one arm for `setup.steps` steps; its curves and end-of-run measures."""
    pl.seed_everything(seed, workers=True, verbose=False)
    started = time.perf_counter()
    task = setup.arithmetic()
    module = build_module(setup, arm, seed, task)
    data = VPDDataModule(task, prompts_per_step=setup.prompts_per_step, val_size=1, seed=seed)
    probes, logger = TeacherProbes(baseline["probe"], setup, setup.probe_every), StepLogger()
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator=accelerator,
            devices=1,
            max_steps=setup.steps,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=logger,
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[probes],
            default_root_dir=root,
        )
        trainer.fit(module, datamodule=data)
    curve = [
        {"step": step, "train_seconds": seconds, **logger.rows.get(step, {})}
        for step, seconds in sorted(probes.train_seconds.items())
    ]
    eval_start = time.perf_counter()
    module = standalone(module, accelerator)  # fit's teardown may have moved it to the CPU
    student = student_measures(module, setup, seed)
    teacher = teacher_repair(module, baseline["probe"], setup, seed)
    return {
        "arm": arm,
        "seed": seed,
        "steps": trainer.global_step,
        "student": student,
        "teacher": teacher,
        "teacher_margin_curve": {"0": baseline["teacher_margin"]}
        | {str(s): m for s, m in sorted(probes.margins.items())},
        "train_curve": curve,
        "train_seconds": curve[-1]["train_seconds"] if curve else 0.0,
        "probe_seconds": probes.probe_seconds,
        "eval_seconds": time.perf_counter() - eval_start,
        "total_seconds": time.perf_counter() - started,
    }


# ----------------------------------------------------------------------------- measures
@torch.no_grad()
def sequence_logprobs(
    module: VPDModule, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]
) -> list[float]:
    """log p(completion | prompt) summed over the completion's tokens, with the weights that are
    live (the caller picks the role), 16 sequences a forward."""
    model, pad = module.policy.model, module.tokenizer.pad_token_id or 0
    was_training = model.training
    model.eval()
    out: list[float] = []
    for start in range(0, len(prompts), 16):
        rows = [
            (list(p), list(c))
            for p, c in zip(
                prompts[start : start + 16], completions[start : start + 16], strict=True
            )
        ]
        width = max(len(p) + len(c) for p, c in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        targets = torch.zeros_like(ids, dtype=torch.bool)
        for i, (p, c) in enumerate(rows):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            mask[i, : len(p) + len(c)] = 1
            targets[i, len(p) : len(p) + len(c)] = True
        device = next(model.parameters()).device
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        picked = logp.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
        out += (picked * targets[:, 1:].to(device)).sum(-1).tolist()
    model.train(was_training)
    return out


def reference_completion(module: VPDModule, task: ArithmeticTask, record: dict) -> list[int]:
    ids = module.tokenizer(task.reference_solution(record), add_special_tokens=False)["input_ids"]
    return [*ids, module.tokenizer.eos_token_id]


def student_measures(module: VPDModule, setup: Setup, seed: int) -> dict:
    """Held-out accuracy (mean over samples, per prompt) and log p(reference) per token."""
    task, records = module.task, held_out_records(setup)
    params = SamplingParams(
        setup.val_samples, setup.val_temperature, 1.0, setup.max_new_tokens, 10_000 + seed
    )
    with module.policy.student():
        attempts = answer_records(module.engine, module.tokenizer, task, records, params, 1)
        references = [reference_completion(module, task, r) for r in records]
        logps = sequence_logprobs(module, attempts.prompt_ids, references)
    return {
        "accuracy": attempts.rewards().mean(1).tolist(),
        "logp_correct": [lp / len(ref) for lp, ref in zip(logps, references, strict=True)],
        "finished_fraction": 1.0
        - statistics.fmean(bool(v.info.get("truncated")) for v in attempts.verdicts),
    }


def contexts_of(
    module: VPDModule, setup: Setup, probe: list[dict], feedback: str
) -> list[list[int]]:
    """The teacher prompt of each probe item: its question and the verifier's feedback on its
    wrong attempt (`feedback`: the diagnostic text, or only 'Your answer is incorrect.')."""
    builder = TeacherContextBuilder(
        module.tokenizer, source="verifier", max_context_tokens=setup.max_context_tokens
    )
    texts = [item["feedback"] if feedback == "diagnostic" else BINARY_FEEDBACK for item in probe]
    verdicts = [[Verdict(0.0, text, {})] for text in texts]
    built = builder.build_batch(
        [item["record"] for item in probe], [[item["wrong_text"]] for item in probe], verdicts
    )
    return [c.prompt_ids for (c,) in built]


def teacher_margins(module: VPDModule, setup: Setup, probe: list[dict]) -> dict[str, list[float]]:
    """Per feedback kind and probe item: log q(right | x, C) - log q(wrong | x, C)."""
    out = {}
    with module.policy.distilled_teacher():
        for feedback in FEEDBACKS:
            prompts = contexts_of(module, setup, probe, feedback)
            right = sequence_logprobs(module, prompts, [i["right_ids"] for i in probe])
            wrong = sequence_logprobs(module, prompts, [i["wrong_ids"] for i in probe])
            out[feedback] = [r - w for r, w in zip(right, wrong, strict=True)]
    return out


def teacher_repair(module: VPDModule, probe: list[dict], setup: Setup, seed: int) -> dict:
    """Per probe item: the distilled teacher's repair rate given each feedback kind, and the
    student's rate of answering right without feedback."""
    records = [item["record"] for item in probe]
    params = SamplingParams(
        setup.repair_samples, setup.val_temperature, 1.0, setup.max_new_tokens, 20_000 + seed
    )

    def rate(attempts: Attempts) -> list[float]:
        return attempts.rewards().mean(1).tolist()

    out = {}
    with module.policy.distilled_teacher():
        for feedback in FEEDBACKS:
            prompts = contexts_of(module, setup, probe, feedback)
            answers = sample_and_verify(
                module.engine, module.tokenizer, module.task, records, prompts, params, 1
            )
            out[f"repair_{feedback}"] = rate(answers)
    with module.policy.student():
        out["self_fix"] = rate(
            answer_records(module.engine, module.tokenizer, module.task, records, params, 1)
        )
    return out


def held_out_records(setup: Setup) -> list[dict]:
    """The fixed held-out prompts: the first `val_size` of the test split."""
    records = setup.arithmetic().records("test")
    if len(records) < setup.val_size:
        raise ValueError(
            f"the test split has {len(records)} prompts, fewer than --val-size {setup.val_size}; "
            "lower --val-size or make the task larger"
        )
    return records[: setup.val_size]


def baseline(setup: Setup, accelerator: str) -> dict:
    """The untrained student's measures, the probe set drawn from its held-out answers, and the
    untrained teacher's probe measures (step 0 of every arm: LoRA starts as the identity)."""
    start = time.perf_counter()
    module = standalone(build_module(setup, "vpd", setup.seeds[0], setup.arithmetic()), accelerator)
    task, records = module.task, held_out_records(setup)
    params = SamplingParams(setup.val_samples, setup.val_temperature, 1.0, setup.max_new_tokens, 0)
    with module.policy.student():
        attempts = answer_records(module.engine, module.tokenizer, task, records, params, 1)
    probe = probe_items(attempts, setup.probe_size)
    student = student_measures(module, setup, seed=-1)
    return {
        "student": student,
        "probe": probe,
        "teacher_margin": teacher_margins(module, setup, probe),
        "teacher": teacher_repair(module, probe, setup, seed=-1),
        "seconds": time.perf_counter() - start,
    }


def probe_items(attempts: Attempts, size: int) -> list[dict]:
    """Prompts with a finished wrong attempt and a right one: the first of each, in prompt order."""
    items = []
    for i, group in enumerate(attempts.groups()):
        verdicts = attempts.verdicts[group]
        wrong = [j for j, v in enumerate(verdicts) if v.reward < 1 and not v.info.get("truncated")]
        right = [j for j, v in enumerate(verdicts) if v.reward >= 1]
        if wrong and right:
            w, r = group.start + wrong[0], group.start + right[0]
            items.append(
                {
                    "record": attempts.records[i],
                    "wrong_text": attempts.texts[w],
                    "wrong_ids": attempts.completion_ids[w],
                    "right_ids": attempts.completion_ids[r],
                    "feedback": attempts.verdicts[w].feedback,
                }
            )
    return items[:size]


# ----------------------------------------------------------------------------- calibration
def standalone(module: VPDModule, accelerator: str) -> VPDModule:
    """A module used outside a Trainer (baseline, calibration; they sample and score only), on
    the GPU if asked for or (`auto`) present."""
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return module.to("cuda") if gpu else module


def calibrate(model: str, calibration: Calibration, accelerator: str) -> dict:
    """The untrained model's finished fraction and accuracy per difficulty and cap (training
    split only), and the choice they imply."""
    cap = max(calibration.caps)
    setup = Setup(model=model, task=calibration.candidates[0], max_new_tokens=cap)
    module = standalone(build_module(setup, "vpd", 0, setup.arithmetic()), accelerator)
    rows = []
    for candidate in calibration.candidates:
        start = time.perf_counter()
        task = replace(setup, task=candidate).arithmetic()
        records = task.records("train")[: calibration.prompts]
        if len(records) < calibration.prompts:
            raise SystemExit(
                f"calibration: {candidate} has {len(records)} training prompts, fewer than "
                f"{calibration.prompts} (its test split takes the first 200 distinct problems); "
                "use a larger max_operand or num_ops"
            )
        params = SamplingParams(calibration.samples, calibration.temperature, 1.0, cap, 0)
        with module.policy.student():
            attempts = answer_records(module.engine, module.tokenizer, task, records, params, 1)
        lengths = [len(c) for c in attempts.completion_ids]
        finished = [not v.info.get("truncated") for v in attempts.verdicts]
        rewards = [v.reward for v in attempts.verdicts]
        rows.append(
            {
                "task": candidate,
                "per_cap": {
                    str(c): {
                        "finished": statistics.fmean(
                            f and n <= c for f, n in zip(finished, lengths, strict=True)
                        ),
                        "accuracy": statistics.fmean(
                            r * (f and n <= c)
                            for r, f, n in zip(rewards, finished, lengths, strict=True)
                        ),
                    }
                    for c in calibration.caps
                },
                "median_length": statistics.median(lengths),
                "seconds": time.perf_counter() - start,
                "example": attempts.texts[0],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return {"rule": asdict(calibration), "candidates": rows, "choice": choose(rows, calibration)}


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


# ----------------------------------------------------------------------------- statistics
def bootstrap(
    a: list[list[float]],
    b: list[list[float]] | None = None,
    samples: int = BOOTSTRAP_SAMPLES,
) -> list[float]:
    """95% percentile interval of mean(a), or of the paired mean(a - b): a and b are seeds x
    items matrices with matched seeds (same prompt order and rollout seeds) and the same items,
    so seeds and items are resampled once for both. No items (an empty probe set): NaN."""
    rng = random.Random(0)
    seeds, items = len(a), len(a[0])
    if items == 0:
        return [float("nan"), float("nan")]
    diff = (
        a
        if b is None
        else [[x - y for x, y in zip(ra, rb, strict=True)] for ra, rb in zip(a, b, strict=False)]
    )
    values = []
    for _ in range(samples):
        picked_seeds = [rng.randrange(seeds) for _ in range(seeds)]
        picked_items = [rng.randrange(items) for _ in range(items)]
        values.append(statistics.fmean(diff[s][i] for s in picked_seeds for i in picked_items))
    values.sort()
    return [values[int(0.025 * samples)], values[int(0.975 * samples) - 1]]


def measure_matrices(runs: list[dict], last_step: int) -> dict[str, list[list[float]]]:
    """Per measure, the seeds x items matrix of one arm's runs (in seed order)."""
    runs = sorted(runs, key=lambda r: r["seed"])
    out = {
        "student_accuracy": [r["student"]["accuracy"] for r in runs],
        "student_logp_correct": [r["student"]["logp_correct"] for r in runs],
    }
    for feedback in FEEDBACKS:
        out[f"teacher_skill_{feedback}"] = [
            [
                t - s
                for t, s in zip(
                    r["teacher"][f"repair_{feedback}"], r["teacher"]["self_fix"], strict=True
                )
            ]
            for r in runs
        ]
        out[f"teacher_margin_{feedback}"] = [
            r["teacher_margin_curve"][str(last_step)][feedback] for r in runs
        ]
    return out


def baseline_matrices(base: dict) -> dict[str, list[list[float]]]:
    out = {
        "student_accuracy": [base["student"]["accuracy"]],
        "student_logp_correct": [base["student"]["logp_correct"]],
    }
    for feedback in FEEDBACKS:
        t = base["teacher"]
        out[f"teacher_skill_{feedback}"] = [
            [a - b for a, b in zip(t[f"repair_{feedback}"], t["self_fix"], strict=True)]
        ]
        out[f"teacher_margin_{feedback}"] = [base["teacher_margin"][feedback]]
    return out


def summarize(setup: Setup, base: dict, runs: list[dict]) -> dict:
    """Per arm and measure: mean and interval; per comparison: the paired difference."""
    matrices = {
        arm: measure_matrices([r for r in runs if r["arm"] == arm], setup.steps)
        for arm in setup.arms
        if any(r["arm"] == arm for r in runs)
    }
    before = baseline_matrices(base)
    summary = {"before": {}, "arms": {}, "differences": []}
    for measure, matrix in before.items():
        summary["before"][measure] = {"mean": _mean(matrix), "ci95": bootstrap(matrix)}
    for arm, by_measure in matrices.items():
        summary["arms"][arm] = {
            measure: {
                "mean": _mean(m),
                "ci95": bootstrap(m),
                "seed_means": [_mean([row]) for row in m],
            }
            for measure, m in by_measure.items()
        }
    for a, b in COMPARISONS:
        if (
            a in matrices
            and b in matrices
            and len(matrices[a]["student_accuracy"]) == len(matrices[b]["student_accuracy"])
        ):
            for measure in matrices[a]:
                ma, mb = matrices[a][measure], matrices[b][measure]
                low, high = bootstrap(ma, mb)
                summary["differences"].append(
                    {
                        "a": a,
                        "b": b,
                        "measure": measure,
                        "difference": _mean(ma) - _mean(mb),
                        "ci95": [low, high],
                        "excludes_0": low > 0 or high < 0,
                    }
                )
    return summary


def _mean(matrix: list[list[float]]) -> float:
    values = [x for row in matrix for x in row]
    return statistics.fmean(values) if values else float("nan")


# ----------------------------------------------------------------------------- report
def markdown_tables(result: dict) -> str:
    """Per arm the end-of-run measures with intervals, then the paired differences."""
    summary, setup = result["summary"], result["plan"]["setup"]
    shown = (
        "student_accuracy",
        "student_logp_correct",
        "teacher_skill_diagnostic",
        "teacher_skill_binary",
        "teacher_margin_diagnostic",
        "teacher_margin_binary",
    )
    heads = (
        "student accuracy",
        "student log p(ref)/token",
        "teacher skill (diag.)",
        "teacher skill (binary)",
        "teacher margin (diag.)",
        "teacher margin (binary)",
    )
    lines = [
        "| arm | seeds | " + " | ".join(heads) + " |",
        "|---|---|" + "---|" * len(shown),
    ]

    def cell(stat: dict) -> str:
        return f"{stat['mean']:.3f} [{stat['ci95'][0]:.3f}, {stat['ci95'][1]:.3f}]"

    lines.append(
        "| before training | - | " + " | ".join(cell(summary["before"][m]) for m in shown) + " |"
    )
    for arm, stats in summary["arms"].items():
        seeds = len(stats["student_accuracy"]["seed_means"])
        lines.append(f"| {arm} | {seeds} | " + " | ".join(cell(stats[m]) for m in shown) + " |")
    lines += [
        "",
        f"Paired differences after {setup['steps']} steps (95% bootstrap intervals; **bold**: "
        "the interval excludes 0):",
        "",
        "| difference | " + " | ".join(heads) + " |",
        "|---|" + "---|" * len(shown),
    ]
    by_pair: dict[tuple[str, str], dict[str, dict]] = {}
    for d in summary["differences"]:
        by_pair.setdefault((d["a"], d["b"]), {})[d["measure"]] = d
    for (a, b), measures in by_pair.items():
        cells = []
        for m in shown:
            d = measures[m]
            text = f"{d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
            cells.append(f"**{text}**" if d["excludes_0"] else text)
        lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Training reward per step, teacher margin per probe step (mean over seeds and items, both
    feedback kinds), and end-of-run student accuracy with intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(
        zip(ARMS, ("tab:blue", "tab:orange", "tab:gray", "tab:green", "tab:purple"), strict=True)
    )
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.6))
    summary = result["summary"]
    for arm in summary["arms"]:
        runs = [r for r in result["runs"] if r["arm"] == arm]
        steps = sorted({row["step"] for r in runs for row in r["train_curve"]})
        reward = [
            statistics.fmean(
                row["train/reward_mean"]
                for r in runs
                for row in r["train_curve"]
                if row["step"] == s and "train/reward_mean" in row
            )
            for s in steps
        ]
        axes[0].plot(steps, reward, color=colors[arm], label=f"{arm} (n={len(runs)})")
        for ax, feedback in zip(axes[1:3], FEEDBACKS, strict=True):
            probe_steps = sorted(int(s) for s in runs[0]["teacher_margin_curve"])
            margin = [
                _mean([r["teacher_margin_curve"][str(s)][feedback] for r in runs])
                for s in probe_steps
            ]
            ax.plot(probe_steps, margin, marker="o", color=colors[arm], label=arm)
    names = ["before", *summary["arms"]]
    stats = [summary["before"]["student_accuracy"]]
    stats += [summary["arms"][a]["student_accuracy"] for a in summary["arms"]]
    means = [s["mean"] for s in stats]
    errors = [
        [m - s["ci95"][0] for m, s in zip(means, stats, strict=True)],
        [s["ci95"][1] - m for m, s in zip(means, stats, strict=True)],
    ]
    axes[3].bar(
        names, means, yerr=errors, capsize=4, color=["lightgray", *(colors[n] for n in names[1:])]
    )
    axes[0].set(xlabel="training step", ylabel="train reward (mean over rollouts)")
    for ax, feedback in zip(axes[1:3], FEEDBACKS, strict=True):
        ax.set(xlabel="training step", ylabel=f"log q(right) - log q(wrong), nats ({feedback} C)")
        ax.set_title(f"teacher margin, {feedback} feedback")
    axes[3].set_ylabel("held-out accuracy (95% CI)")
    axes[3].tick_params(axis="x", labelrotation=20)
    axes[0].legend(fontsize=8)
    setup = result["plan"]["setup"]
    fig.suptitle(
        f"{setup['model'].removeprefix('builtin:')} + LoRA r={setup['lora_r']}: arithmetic "
        f"{setup['task']}, {setup['steps']} steps, seeds {setup['seeds']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ----------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--output", type=Path, default=RESULTS / "compare-cpu.json")
    parser.add_argument("--calibrate", action="store_true", help="phase 1 only (unless --run)")
    parser.add_argument("--run", action="store_true", help="with --calibrate: go on to the runs")
    parser.add_argument("--resume", action="store_true", help="keep the JSON's finished runs")
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG of --output")
    parser.add_argument(
        "--summarize-only",
        action="store_true",
        help="summarize the runs in --output over the seeds every arm finished (a cut-short run)",
    )
    parser.add_argument("--device", default="auto", help="Lightning accelerator: auto, cpu, gpu")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--val-size", type=int)
    parser.add_argument("--probe-size", type=int)
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--arms", nargs="+", choices=ARMS)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--estep-every", type=int)
    parser.add_argument("--calibration-prompts", type=int)
    parser.add_argument("--accuracy-band", nargs=2, type=float, metavar=("LOW", "HIGH"))
    parser.add_argument("--finish-target", type=float)
    return parser.parse_args()


def write(path: Path, result: dict) -> None:
    """Atomically: a crash mid-write keeps the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(partial, path)


def main() -> None:
    args = parse_args()
    result = json.loads(args.output.read_text()) if args.output.exists() else {}
    if args.replot:
        plot(result, args.output.with_suffix(".png"))
        return
    if args.calibrate:
        calibration = Calibration()
        if args.calibration_prompts:
            calibration.prompts = args.calibration_prompts
        if args.accuracy_band:
            calibration.accuracy_band = tuple(args.accuracy_band)
        if args.finish_target is not None:
            calibration.finish_target = args.finish_target
        result = {"calibration": calibrate(args.model, calibration, args.device)}
        write(args.output, result)
        print("calibration choice:", result["calibration"]["choice"])
        if not args.run:
            return
    if args.summarize_only:
        finish(result, args.output, stopped_early=True)
        return
    if "calibration" not in result:
        raise SystemExit(f"{args.output} has no calibration: run with --calibrate first")
    choice = result["calibration"]["choice"]
    overrides = {
        k: v
        for k, v in dict(
            steps=args.steps,
            val_size=args.val_size,
            probe_size=args.probe_size,
            seeds=args.seeds,
            arms=args.arms,
            lr=args.lr,
            estep_every=args.estep_every,
        ).items()
        if v is not None
    }
    setup = Setup(
        model=args.model, task=choice["task"], max_new_tokens=choice["max_new_tokens"], **overrides
    )
    plan = plan_of(setup, result)
    kept = []
    if args.resume and result.get("runs"):
        changed = plan_changes(result.get("plan") or {}, plan)
        if changed:
            raise SystemExit(
                f"--resume: the plan in {args.output} differs from this invocation's in "
                f"{', '.join(changed)}; its {len(result['runs'])} finished runs would not be "
                "comparable. Rerun with the same options, or give a new --output"
            )
        kept = result["runs"]
    result = {
        "calibration": result["calibration"],
        "plan": plan,
        "baseline": result.get("baseline") if kept else None,
        "runs": kept,
    }
    write(args.output, result)  # the plan is on disk before any run
    started = time.perf_counter()
    if result["baseline"] is None:
        result["baseline"] = baseline(setup, args.device)
        write(args.output, result)
        print(f"baseline: {summary_line(result['baseline'])}", flush=True)
    for seed in setup.seeds:
        for arm in setup.arms:
            if any(r["arm"] == arm and r["seed"] == seed for r in result["runs"]):
                continue
            run = run_arm(setup, arm, seed, result["baseline"], args.device)
            result["runs"].append(run)
            write(args.output, result)
            print(
                f"[{time.perf_counter() - started:6.0f}s] {arm} seed={seed}: "
                f"{summary_line(run)}, train {run['train_seconds']:.0f}s, "
                f"probes {run['probe_seconds']:.0f}s, eval {run['eval_seconds']:.0f}s",
                flush=True,
            )
    finish(result, args.output, stopped_early=False)


def plan_changes(old: dict, new: dict) -> list[str]:
    """The entries (setup options by name) in which two plans differ."""
    changed = [
        f"setup.{k}"
        for k in sorted(set(old.get("setup", {})) | set(new.get("setup", {})))
        if old.get("setup", {}).get(k) != new.get("setup", {}).get(k)
    ]
    others = (set(old) | set(new)) - {"setup"}
    return changed + sorted(k for k in others if old.get(k) != new.get(k))


def finish(result: dict, output: Path, stopped_early: bool) -> None:
    """Summary over the seeds every arm finished (paired differences need matched seeds), the
    plot and the tables. `stopped_early`: the runs were cut short; the plan stays as written."""
    setup = Setup(**result["plan"]["setup"])
    done = {
        seed
        for seed in setup.seeds
        if all(any(r["arm"] == a and r["seed"] == seed for r in result["runs"]) for a in setup.arms)
    }
    summarized = [r for r in result["runs"] if r["seed"] in done]
    result["summary"] = summarize(setup, result["baseline"], summarized)
    result["summary"]["seeds"] = sorted(done)
    result["summary"]["stopped_early"] = stopped_early
    result["machine"] = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    # summed from the records, not timed here: a resumed invocation times only its own runs
    result["seconds"] = result["baseline"]["seconds"] + sum(
        r["total_seconds"] for r in result["runs"]
    )
    write(output, result)
    plot(result, output.with_suffix(".png"))
    print(markdown_tables(result))
    print(f"wrote {output} and {output.with_suffix('.png')}")


def summary_line(measured: dict) -> str:
    """Accuracy and diagnostic teacher margin of a baseline or a run, for the progress lines."""
    accuracy = statistics.fmean(measured["student"]["accuracy"])
    curve = measured.get("teacher_margin_curve")
    margins = curve[max(curve, key=int)] if curve else measured["teacher_margin"]
    margin = _mean([margins["diagnostic"]])
    return f"student accuracy {accuracy:.3f}, teacher margin (diagnostic) {margin:+.2f}"


def plan_of(setup: Setup, result: dict) -> dict:
    """The plan as written before any run: setup, measures, endpoint, comparisons, sizing."""
    return {
        "setup": asdict(setup),
        "primary_endpoint": setup.primary_endpoint,
        "measures": MEASURES,
        "comparisons": [f"{a} - {b}" for a, b in COMPARISONS],
        "bootstrap": f"{BOOTSTRAP_SAMPLES} percentile resamples of seeds and items; a paired "
        "difference resamples the same seeds and items for both arms",
        "rollout_budget_per_run": setup.steps * setup.prompts_per_step * setup.num_generations,
        "sizing": sizing(setup, result["calibration"]),
    }


def sizing(setup: Setup, calibration: dict) -> dict:
    """Expected minutes, from measured times: per-step phases of `train_step.py --compare`
    (its JSON: 48-token cap, 16 rollouts) scaled by the chosen task's median response length
    over that run's mean and by the rollouts per step, and the calibration's seconds per sampled response for the evaluations."""
    path = RESULTS / "train-step-vs-trl-cpu.json"
    if not path.exists():
        return {"note": f"no {path.name}: run benchmarks/train_step.py --compare to size the run"}
    phases = {row["name"]: row for row in json.loads(path.read_text())["results"]}
    chosen = next(
        r for r in calibration["candidates"] if r["task"] == calibration["choice"]["task"]
    )
    vpd = phases["vpd (cached)"]
    measured_rollouts = 16  # train_step.py --compare: 4 prompts x 4 rollouts
    rollouts = setup.prompts_per_step * setup.num_generations
    scale = chosen["median_length"] / (vpd["completion_tokens"] / measured_rollouts)
    scale *= rollouts / measured_rollouts
    per_step = {
        "grpo": phases["grpo (cached)"]["rollout_s"] + phases["grpo (cached)"]["mstep_s"],
        "sdpo": phases["sdpo (cached)"]["rollout_s"] + phases["sdpo (cached)"]["mstep_s"],
        "vpd-no-estep": vpd["rollout_s"] + vpd["mstep_s"],
        "vpd": vpd["rollout_s"] + vpd["mstep_s"] + vpd["estep_s"],
        "vpd-fixed-prior": vpd["rollout_s"] + vpd["mstep_s"] + vpd["estep_s"],
    }
    rule = calibration["rule"]
    per_response = chosen["seconds"] / (rule["prompts"] * rule["samples"])
    responses = setup.val_size * setup.val_samples + 3 * setup.probe_size * setup.repair_samples
    eval_s = per_response * responses
    train_s = sum(per_step[a] * scale * setup.steps for a in setup.arms) * len(setup.seeds)
    minutes = (train_s + eval_s * (len(setup.arms) * len(setup.seeds) + 1)) / 60
    return {
        "step_seconds_at_48_tokens": per_step,
        "length_scale": scale,
        "eval_seconds_per_run": eval_s,
        "expected_minutes": minutes,
    }


if __name__ == "__main__":
    main()
