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
3. `plan` (`study_design.py`): arms, seeds, steps, the gate's context, measures, the primary
   endpoint with its minimum detectable effect (`power.py`, from the previous study's seed-to-seed
   spread), and every part's expected duration, priced from the previous study's measured times.
   Runs only read it.
4. `baseline`: the untrained student on the held-out prompts (LoRA starts as the identity, so every
   arm starts from this model), the teacher probe set and the sample bank drawn from its answers.
5. `runs`: every arm for each of its seeds (the same seed gives every arm the same prompt order
   and rollout seeds), teacher probes at the end, the held-out measures.
6. `summary` (`study_summary.py`, with the tables and the figure): per arm and per paired
   difference, the mean, a 95% t-interval across seeds (seeds are the unit: 3 degrees of freedom
   with 4 seeds) and, per seed, one over prompts.

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
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import lightning.pytorch as pl
import torch
from gate import GateRule, paired_items, run_gate
from lightning.pytorch.loggers import Logger
from study_design import (
    ARMS,
    CONTEXT_SOURCE,
    FEEDBACKS,
    Calibration,
    Setup,
    choose,
    plan_changes,
    plan_of,
)
from study_summary import markdown_tables, mean_of, plot, summarize

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
    margin = mean_of([margins["diagnostic"]])
    return f"student accuracy {accuracy:.3f}, teacher margin (diagnostic) {margin:+.3f}/token"


if __name__ == "__main__":
    main()
