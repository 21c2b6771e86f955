"""Does training the teacher help? vpd against vpd-no-estep (the primary pair), vpd with its own
teacher adapter, sdpo and grpo as their authors run them, on SmolLM2-135M-Instruct + LoRA,
arithmetic, decided in advance (issues 23 and 32).

Phases, each written into the JSON before the next starts:
1. `calibration` (`--calibrate`): the task is fixed from the untrained model on the training split
   only: for each candidate difficulty, `samples` responses at `temperature` to `prompts` training
   prompts with a generous cap. `max_new_tokens` is the smallest candidate cap within which at
   least 95% of the responses finish; the difficulty is the candidate whose accuracy at that cap
   (a response cut off scores 0) lies in the target band, nearest its middle.
2. `gate` (`gate.py`): can the untrained model's teacher use a context at all? Training proceeds
   only with a context whose teacher beats the student alone and a shuffled control by the
   margin fixed in advance; otherwise the study stops here and says so.
3. `plan`: arms, seeds, steps, the gate's context, measures, the primary endpoint with its minimum
   detectable effect (`power.py`, from the previous study's seed-to-seed spread), and every
   part's expected duration, priced from the previous study's measured times. Runs only read it.
4. `baseline`: the untrained student on the held-out prompts (LoRA starts as the identity, so every
   arm starts from this model), the teacher probe set and the sample bank drawn from its answers.
5. `runs`: every arm for each of its seeds (the same seed gives every arm the same prompt order
   and rollout seeds), teacher probes at the end, the held-out measures.
6. `summary`: per arm and per paired difference, the mean, a 95% t-interval across seeds (seeds
   are the unit: 3 degrees of freedom with 4 seeds) and, per seed, one over prompts.

Arms differ from their neighbour in one setting: `vpd-no-estep` is `vpd` with `estep.every: 0`
(same contexts, divergence, vocabulary and teacher weights), the thesis's control;
`vpd-adapter` is `vpd` with `teacher_mode: adapter`, so its E-step can only change the teacher,
not the student (with shared weights the E-step is also an update of the student by the verifier's
labels); `sdpo` keeps its reference settings (sibling solution, else feedback; EMA teacher;
top-100 + tail; JSD) and `grpo` the paper's baseline (no std normalisation). The last training
step is never an E-step (`Setup` refuses such a schedule): the trainer runs a due E-step after
the M-step of the same step (`trainer/module.py`, `training_step`), which would change the
student just before evaluation with no M-step after it.

    .venv/bin/python benchmarks/compare_methods.py --calibrate   # phase 1 (25 min, half of it loaded)
    .venv/bin/python benchmarks/compare_methods.py --gate        # phases 2-3 (25 min)
    .venv/bin/python benchmarks/compare_methods.py               # phases 4-6 (the plan's time)
    .venv/bin/python benchmarks/compare_methods.py --resume      # go on after an interruption
    .venv/bin/python benchmarks/compare_methods.py --model builtin:tiny-random --steps 3 \
        --estep-every 2 --val-size 4 --probe-size 2 --seeds 0 --calibration-prompts 2 \
        --accuracy-band 0 1 --finish-target 0 --no-gate --output /tmp/smoke.json --calibrate --run

`--no-gate` (smoke tests of the pipeline) records that the gate was skipped. `--resume` keeps the
runs already in the JSON, and refuses when its plan differs.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import lightning.pytorch as pl
import torch
from gate import CONTEXTS, GateRule, paired_items, run_gate
from lightning.pytorch.loggers import Logger
from power import minimum_detectable_effect, sd_upper_bound, t_interval

from vpd_lightning.options import (
    DistillOptions,
    EStepOptions,
    GrpoOptions,
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


# ----------------------------------------------------------------------------- modules and runs
def build_module(setup: Setup, arm: str, seed: int, task: ArithmeticTask) -> VPDModule:
    """One arm's module; vpd's teacher optimizer is the student's (same class and lr)."""
    method = "vpd" if arm.startswith("vpd") else arm
    return VPDModule(
        model=setup.model,
        method=method,
        teacher_mode="adapter" if arm == "vpd-adapter" else "shared",
        lora=LoraOptions(r=setup.lora_r, alpha=setup.lora_alpha),
        feedback_source=CONTEXT_SOURCE.get(setup.context, setup.context)
        if method == "vpd"
        else None,
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
        # The paper's GRPO baseline follows SDPO's configs: no std normalisation
        # (lasgroup/SDPO verl/trainer/config/baseline_grpo.yaml:20).
        grpo=GrpoOptions(normalize_std=False),
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
    """Teacher log-margins on the probe set every `every` steps (0: none before the last) and
    at the last step, timed apart from training."""

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
        if (self.every and step % self.every == 0) or step == trainer.max_steps:
            start = time.perf_counter()
            self.margins[step] = teacher_margins(pl_module, self.setup, self.probe)
            self.probe_seconds += time.perf_counter() - start


def run_arm(setup: Setup, arm: str, seed: int, baseline: dict, accelerator: str) -> dict:
    """Train one arm for `setup.steps` steps; its curves and end-of-run measures."""
    pl.seed_everything(seed, workers=True, verbose=False)
    started = time.perf_counter()
    task = setup.arithmetic(setup.feedback_level(arm))
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
    student = student_measures(module, setup, seed, baseline["bank"])
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


def per_token(logps: Sequence[float], completions: Sequence[Sequence[int]]) -> list[float]:
    """Sequence log-probs divided by their lengths (nats per token): arms whose responses differ
    in length stay comparable."""
    return [lp / max(len(c), 1) for lp, c in zip(logps, completions, strict=True)]


def sample_bank(attempts: Attempts) -> list[dict]:
    """The untrained model's finished samples of the held-out prompts that have a right and a
    wrong one: per prompt, its prompt ids and its right and wrong completions."""
    bank = []
    for i, group in enumerate(attempts.groups()):
        finished = [
            (attempts.completion_ids[j], attempts.verdicts[j].reward >= 1)
            for j in range(group.start, group.stop)
            if not attempts.verdicts[j].info.get("truncated")
        ]
        right = [c for c, ok in finished if ok]
        wrong = [c for c, ok in finished if not ok]
        if right and wrong:
            bank.append({"prompt_ids": attempts.prompt_ids[i], "right": right, "wrong": wrong})
    return bank


def bank_margins(module: VPDModule, bank: list[dict]) -> list[float]:
    """Per bank prompt: mean per-token log p(right samples) - mean per-token log p(wrong ones)
    under the live weights."""
    prompts, completions, owners = [], [], []
    for k, entry in enumerate(bank):
        for label in ("right", "wrong"):
            for completion in entry[label]:
                prompts.append(entry["prompt_ids"])
                completions.append(completion)
                owners.append((k, label))
    scores = per_token(sequence_logprobs(module, prompts, completions), completions)
    by: dict[tuple[int, str], list[float]] = {}
    for owner, score in zip(owners, scores, strict=True):
        by.setdefault(owner, []).append(score)
    return [
        statistics.fmean(by[(k, "right")]) - statistics.fmean(by[(k, "wrong")])
        for k in range(len(bank))
    ]


def student_measures(module: VPDModule, setup: Setup, seed: int, bank: list[dict]) -> dict:
    """Held-out accuracy (mean over samples, per prompt) and the sample bank's margins."""
    task, records = module.task, held_out_records(setup)
    params = SamplingParams(
        setup.val_samples, setup.val_temperature, 1.0, setup.max_new_tokens, 10_000 + seed
    )
    with module.policy.student():
        attempts = answer_records(module.engine, module.tokenizer, task, records, params, 1)
        margins = bank_margins(module, bank)
    return {
        "accuracy": attempts.rewards().mean(1).tolist(),
        "bank_margin": margins,
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
    """Per feedback kind and probe item: log q(right | x, C) - log q(wrong | x, C), each per
    token of its own attempt."""
    out = {}
    rights, wrongs = [i["right_ids"] for i in probe], [i["wrong_ids"] for i in probe]
    with module.policy.distilled_teacher():
        for feedback in FEEDBACKS:
            prompts = contexts_of(module, setup, probe, feedback)
            right = per_token(sequence_logprobs(module, prompts, rights), rights)
            wrong = per_token(sequence_logprobs(module, prompts, wrongs), wrongs)
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
    probe, bank = paired_items(attempts, setup.probe_size), sample_bank(attempts)
    student = student_measures(module, setup, -1, bank)
    return {
        "student": student,
        "probe": probe,
        "bank": bank,
        "teacher_margin": teacher_margins(module, setup, probe),
        "teacher": teacher_repair(module, probe, setup, seed=-1),
        "seconds": time.perf_counter() - start,
    }


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
def run_measures(run: dict, last_step: int) -> dict[str, list[float]]:
    """One run's per-item values of every measure."""
    out = {
        "student_accuracy": run["student"]["accuracy"],
        "student_bank_margin": run["student"]["bank_margin"],
    }
    teacher = run["teacher"]
    for feedback in FEEDBACKS:
        repair = teacher[f"repair_{feedback}"]
        out[f"teacher_skill_{feedback}"] = [
            t - s for t, s in zip(repair, teacher["self_fix"], strict=True)
        ]
        out[f"teacher_margin_{feedback}"] = run["teacher_margin_curve"][str(last_step)][feedback]
    return out


def baseline_measures(base: dict) -> dict[str, list[float]]:
    """The untrained model's per-item values, in the runs' layout."""
    return run_measures(
        {
            "student": base["student"],
            "teacher": base["teacher"],
            "teacher_margin_curve": {"0": base["teacher_margin"]},
        },
        0,
    )


def seed_stats(rows: dict[int, list[float]]) -> dict:
    """Per-seed values (rows over items) -> the mean of the seed means, their 95% t-interval
    across seeds (the seed is the unit), and each seed's own 95% t-interval over items."""
    seed_means = [_mean([rows[s]]) for s in sorted(rows)]
    return {
        "mean": statistics.fmean(seed_means) if seed_means else float("nan"),
        "ci95": t_interval(seed_means),
        "seed_means": seed_means,
        "within_seed_ci95": [t_interval(rows[s]) for s in sorted(rows)],
    }


def summarize(setup: Setup, base: dict, runs: list[dict]) -> dict:
    """Per arm and measure: mean and intervals; per comparison, over the seeds both arms ran:
    the paired difference (item by item within a seed, then across seeds)."""
    by_arm: dict[str, dict[int, dict[str, list[float]]]] = {}
    for run in runs:
        by_arm.setdefault(run["arm"], {})[run["seed"]] = run_measures(run, setup.steps)
    summary: dict = {"before": {}, "arms": {}, "differences": []}
    for measure, values in baseline_measures(base).items():  # one model: over items
        summary["before"][measure] = {"mean": _mean([values]), "ci95": t_interval(values)}
    for arm in [a for a in setup.arms if a in by_arm]:
        seeds = by_arm[arm]
        summary["arms"][arm] = {
            m: seed_stats({s: seeds[s][m] for s in seeds}) for m in seeds[min(seeds)]
        }
    for a, b in COMPARISONS:
        if a not in by_arm or b not in by_arm:
            continue
        common = sorted(set(by_arm[a]) & set(by_arm[b]))
        if not common:
            continue
        for measure in by_arm[a][common[0]]:
            rows = {
                s: [
                    x - y for x, y in zip(by_arm[a][s][measure], by_arm[b][s][measure], strict=True)
                ]
                for s in common
            }
            stats = seed_stats(rows)
            low, high = stats["ci95"]
            summary["differences"].append(
                {
                    "a": a,
                    "b": b,
                    "measure": measure,
                    "seeds": common,
                    "difference": stats["mean"],
                    "seed_differences": stats["seed_means"],
                    "ci95": [low, high],
                    "within_seed_ci95": stats["within_seed_ci95"],
                    "excludes_0": low > 0 or high < 0,
                }
            )
    return summary


def _mean(matrix: list[list[float]]) -> float:
    values = [x for row in matrix for x in row]
    return statistics.fmean(values) if values else float("nan")


# ----------------------------------------------------------------------------- report
TABLE_HEADS = {
    "student_accuracy": "student accuracy",
    "student_logp_correct": "student log p(ref)/token",
    "student_bank_margin": "student bank margin (nats/token)",
    "teacher_skill_diagnostic": "teacher skill (diag.)",
    "teacher_skill_binary": "teacher skill (binary)",
    "teacher_margin_diagnostic": "teacher margin (diag.)",
    "teacher_margin_binary": "teacher margin (binary)",
}
"""Column heads of the measures a study recorded (the 20-step study had log p(reference); the
studies since, the sample bank's margin)."""


def interval_kind(result: dict) -> str:
    """How the study's intervals were computed, as its plan recorded it."""
    plan = result["plan"]
    if "bootstrap" in plan:
        return "95% bootstrap intervals over prompts and seeds"
    return "95% t-intervals across seeds"


def markdown_tables(result: dict) -> str:
    """Per arm the end-of-run measures with intervals, then the paired differences."""
    summary, setup = result["summary"], result["plan"]["setup"]
    shown = [m for m in TABLE_HEADS if m in summary["before"]]
    heads = [TABLE_HEADS[m] for m in shown]
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
        f"Paired differences after {setup['steps']} steps ({interval_kind(result)}; **bold**: "
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
        zip(
            ARMS,
            ("tab:blue", "tab:orange", "tab:gray", "tab:green", "tab:olive", "tab:purple"),
            strict=True,
        )
    )
    fig, axes = plt.subplots(1, 5, figsize=(25, 4.6))
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
    plot_differences(axes[4], result, colors)
    per_token = "/ its tokens" in result["plan"]["measures"]["teacher_margin"]
    axes[0].set(xlabel="training step", ylabel="train reward (mean over rollouts)")
    for ax, feedback in zip(axes[1:3], FEEDBACKS, strict=True):
        unit = "nats per token" if per_token else "nats"
        ax.set(xlabel="training step", ylabel=f"log q(right) - log q(wrong), {unit}")
        ax.set_title(f"teacher margin, {feedback} feedback as C")
    axes[3].set_ylabel("held-out accuracy (95% CI)")
    axes[3].tick_params(axis="x", labelrotation=20)
    axes[0].legend(fontsize=8)
    setup = result["plan"]["setup"]
    context = setup.get("context", "diagnostic")
    fig.suptitle(
        f"{setup['model'].removeprefix('builtin:')} + LoRA r={setup['lora_r']}: arithmetic "
        f"({task_text(setup['task'])}), vpd's teacher context: {context}, {setup['steps']} "
        f"steps, seeds {setup['seeds']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_differences(ax, result: dict, colors: dict[str, str]) -> None:
    """The paired held-out accuracy differences to vpd-no-estep: one dot per seed, the mean and
    its 95% t-interval across seeds, and the plan's minimum detectable effect."""
    rows = [
        d
        for d in result["summary"]["differences"]
        if d["measure"] == "student_accuracy" and d["b"] == "vpd-no-estep"
    ]
    for x, row in enumerate(rows):
        seeds = row.get("seed_differences", [])
        ax.scatter([x] * len(seeds), seeds, color=colors[row["a"]], alpha=0.5, s=18)
        low, high = row["ci95"]
        mean = row["difference"]
        if math.isfinite(low):
            ax.errorbar(
                x + 0.15,
                mean,
                yerr=[[mean - low], [high - mean]],
                fmt="o",
                capsize=4,
                color=colors[row["a"]],
            )
    ax.axhline(0, color="black", linewidth=0.8)
    mde = result["plan"].get("power", {}).get("mde")
    if mde:
        for sign in (1, -1):
            ax.axhline(sign * mde, color="gray", linestyle="--", linewidth=0.8)
        ax.text(
            len(rows) - 0.5,
            mde,
            f"planned MDE {mde:.3f}",
            ha="right",
            va="bottom",
            fontsize=8,
            color="gray",
        )
    ax.set_xticks(range(len(rows)), [f"{row['a']}\n- vpd-no-estep" for row in rows])
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.set_ylabel("held-out accuracy difference (per seed; mean, 95% CI)")
    ax.set_title("paired differences (primary: vpd)")


# ----------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--output", type=Path, default=RESULTS / "compare-cpu.json")
    parser.add_argument(
        "--previous",
        type=Path,
        default=RESULTS / "previous-study-cpu.json",
        help="the previous study (issue 23's 12 runs): the plan's minimum "
        "detectable effect and prices come from its seeds and times",
    )
    parser.add_argument("--calibrate", action="store_true", help="phase 1 only (unless --run)")
    parser.add_argument("--run", action="store_true", help="with --calibrate: go on to the runs")
    parser.add_argument("--gate", action="store_true", help="the gate and the plan, no training")
    parser.add_argument(
        "--calibration-from", type=Path, help="take phase 1 from this JSON instead of --output"
    )
    parser.add_argument(
        "--no-gate",
        action="store_true",
        help="pipeline smoke tests only: skip the gate (recorded) and use the diagnostic context",
    )
    parser.add_argument("--resume", action="store_true", help="keep the JSON's finished runs")
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG of --output")
    parser.add_argument(
        "--summarize-only",
        action="store_true",
        help="summarize the runs in --output (a cut-short run)",
    )
    parser.add_argument("--device", default="auto", help="Lightning accelerator: auto, cpu, gpu")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--val-size", type=int)
    parser.add_argument("--probe-size", type=int)
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--secondary-seeds", nargs="+", type=int)
    parser.add_argument("--arms", nargs="+", choices=ARMS)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--estep-every", type=int)
    parser.add_argument("--gate-items", type=int)
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


def machine_load() -> dict:
    """The machine's load when a phase ends (shared machines: timings are not comparable)."""
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": list(os.getloadavg()),
    }


def gate_phase(setup: Setup, rule: GateRule, accelerator: str) -> dict:
    """The gate on the held-out prompts with the untrained model (the task's diagnostic
    feedback: the gate shows each context itself)."""
    task = setup.arithmetic()
    module = standalone(build_module(setup, "vpd", 0, task), accelerator)
    budget = dict(max_new_tokens=setup.max_new_tokens, max_context_tokens=setup.max_context_tokens)
    gate = run_gate(module, task, held_out_records(setup), rule, budget)
    return {**gate, "machine": machine_load()}


def main() -> None:
    args = parse_args()
    result = json.loads(args.output.read_text()) if args.output.exists() else {}
    previous = json.loads(args.previous.read_text()) if args.previous.exists() else None
    if args.replot:
        plot(result, args.output.with_suffix(".png"))
        return
    if args.calibration_from:
        source = json.loads(args.calibration_from.read_text())
        result = {"calibration": source["calibration"] | {"from": str(args.calibration_from)}}
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
            secondary_seeds=args.secondary_seeds,
            arms=args.arms,
            lr=args.lr,
            estep_every=args.estep_every,
        ).items()
        if v is not None
    }
    setup = Setup(
        model=args.model, task=choice["task"], max_new_tokens=choice["max_new_tokens"], **overrides
    )
    gate = result.get("gate")
    resuming = args.resume and bool(result.get("runs"))
    if args.no_gate:
        gate = {"skipped": "--no-gate: a smoke test of the pipeline, not a study", "chosen": None}
    elif resuming:  # the runs were planned with the gate they had
        gate = gate or {"skipped": "a study from before the gate", "chosen": None}
    elif gate is None or gate.get("skipped"):
        rule = GateRule(items=args.gate_items) if args.gate_items else GateRule()
        gate = gate_phase(setup, rule, args.device)
        result = {"calibration": result["calibration"], "gate": gate}
        write(args.output, result)
        print(f"gate: {gate['verdict']}", flush=True)
    stopped = not args.no_gate and not resuming and gate["chosen"] is None
    setup = replace(setup, context=gate["chosen"] or "diagnostic")
    kept_plan = result.get("plan") if args.resume else None
    plan = plan_of(setup, result, previous, kept_plan)
    if stopped:  # the plan it would have run is kept: what it could have detected, and its price
        plan["stopped_at_gate"] = gate["verdict"]
        write(args.output, {"calibration": result["calibration"], "gate": gate, "plan": plan})
        raise SystemExit(f"the study stops at the gate ({args.output}): {gate['verdict']}")
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
        "gate": gate,
        "plan": plan,
        "baseline": result.get("baseline") if kept else None,
        "runs": kept,
    }
    write(args.output, result)  # the plan is on disk before any run
    if args.gate:
        print(json.dumps({"power": plan["power"], "sizing": plan["sizing"]}, indent=1))
        return
    started = time.perf_counter()
    if result["baseline"] is None:
        result["baseline"] = baseline(setup, args.device)
        write(args.output, result)
        print(f"baseline: {summary_line(result['baseline'])}", flush=True)
    for seed in setup.seeds:
        for arm in setup.arms:
            if seed not in setup.seeds_of(arm) or any(
                r["arm"] == arm and r["seed"] == seed for r in result["runs"]
            ):
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
    """Summary over the runs there are (each difference over the seeds both arms ran), the plot
    and the tables. `stopped_early`: the runs were cut short; the plan stays as written."""
    setup = Setup(**result["plan"]["setup"])
    result["summary"] = summarize(setup, result["baseline"], result["runs"])
    result["summary"]["seeds"] = {
        arm: sorted(r["seed"] for r in result["runs"] if r["arm"] == arm) for arm in setup.arms
    }
    result["summary"]["stopped_early"] = stopped_early
    result["machine"] = machine_load()
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
    return f"student accuracy {accuracy:.3f}, teacher margin (diagnostic) {margin:+.3f}/token"


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


if __name__ == "__main__":
    main()
