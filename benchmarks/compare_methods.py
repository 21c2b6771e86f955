"""GRPO vs SDPO vs VPD on SmolLM2-135M-Instruct + LoRA, one-step arithmetic with diagnostic feedback.

Every method sees the same task, prompts per step, rollouts per prompt, steps, held-out set and
seeds; only `method` (and the learning rate, from a small sweep) changes. The learning-rate sweep
is part of the comparison: every method is run at every `--lrs` value, and the reported run of a
method is the one with the highest mean *training* reward over the second half of its steps, so
that the held-out set plays no part in the choice. All runs are written to the JSON.

    .venv/bin/python benchmarks/compare_methods.py            # the CPU run (about 25 minutes at the defaults)
    .venv/bin/python benchmarks/compare_methods.py --model builtin:tiny-random --steps 2 \
        --eval-every 1 --val-size 4 --output /tmp/compare-smoke.json   # smoke test

Writes the JSON (config, seeds, every curve, timings, notes), a PNG next to it, and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger

from vpd_lightning.config import EStepOptions, LoraOptions, RolloutOptions, ValidationOptions
from vpd_lightning.data import VPDDataModule
from vpd_lightning.module import VPDModule
from vpd_lightning.tasks import ArithmeticTask

RESULTS = Path(__file__).parent / "results"
TRAIN_KEYS = (
    "train/reward_mean",
    "train/success_fraction",
    "train/context_coverage",
    "train/response_length",
    "mstep/loss",
    "mstep/teacher_student_kl",
    "mstep/student_entropy",
    "estep/loss",
    "estep/implicit_reward",
    "estep/margin",
    "estep/delta",
    "time/rollout_s",
    "time/update_s",
    "throughput/tokens_per_s",
)
NOTES = [
    "VPD with a fixed prior (the ablation of issue 6) is not run: the trainer has no option for "
    "it (the E-step's prior is always the current student).",
    "One seed per (method, lr) on the CPU: differences smaller than the step-to-step noise of "
    "train reward (16 rollouts per step) are not evidence.",
    "Held-out accuracy is greedy mean@1 on the first val_size prompts of the task's test split; "
    "the teacher's is the same greedy decoding from the teacher context (verifier feedback on the "
    "student's own greedy answer), so it measures feedback-conditioned accuracy, not the student.",
    "Wall-clock curves count training time only (rollouts and updates); validation time is "
    "excluded. E-steps make VPD's steps uneven in time (one every estep_every steps).",
]


@dataclass
class Setup:
    """Everything shared by the methods; recorded in the JSON."""

    model: str
    steps: int
    eval_every: int
    prompts_per_step: int = 4
    num_generations: int = 4
    max_new_tokens: int = 48
    temperature: float = 0.8
    val_size: int = 32
    lora_r: int = 16
    lora_alpha: int = 32
    estep_every: int = 3
    micro_batch_size: int = 8
    max_context_tokens: int = 96
    task: dict = field(
        default_factory=lambda: dict(
            num_ops=1,
            max_operand=20,
            operations="+-",
            feedback="diagnostic",
            answer_format="last_number",
            seed=0,
        )
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


class CurveRecorder(pl.Callback):
    """Training-only wall-clock per step, and held-out accuracy at each validation."""

    def __init__(self) -> None:
        self.train_seconds: dict[int, float] = {}
        self.val: list[dict] = []
        self._total = 0.0
        self._batch_start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._total += time.perf_counter() - self._batch_start
        self.train_seconds[trainer.global_step] = self._total

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        metrics = trainer.callback_metrics
        row = {"step": trainer.global_step, "train_seconds": self._total}
        for key in ("val/mean@1", "val/pass@1", "val/teacher_mean@1"):
            if key in metrics:
                row[key] = float(metrics[key])
        self.val.append(row)


def train_curve(logger: StepLogger, recorder: CurveRecorder) -> list[dict]:
    """Join each step's logged metrics (logged after its optimizer step, so at `step`) with its
    training wall-clock."""
    rows = []
    for step, seconds in sorted(recorder.train_seconds.items()):
        row = {"step": step, "train_seconds": seconds}
        row.update(logger.rows.get(step, {}))
        rows.append(row)
    return rows


def build_module(setup: Setup, method: str, lr: float, seed: int) -> VPDModule:
    """One method's module; the teacher optimizer (VPD's E-step) uses the student's lr."""

    def optimizer(params):
        return torch.optim.AdamW(params, lr=lr)

    return VPDModule(
        model=setup.model,
        method=method,
        lora=LoraOptions(r=setup.lora_r, alpha=setup.lora_alpha),
        max_context_tokens=setup.max_context_tokens,
        rollout=RolloutOptions(
            num_generations=setup.num_generations,
            temperature=setup.temperature,
            max_new_tokens=setup.max_new_tokens,
        ),
        estep=EStepOptions(every=setup.estep_every),
        validation=ValidationOptions(
            num_samples=1,
            pass_k=[1],
            temperature=0.0,
            max_new_tokens=setup.max_new_tokens,
            teacher=method == "vpd",
        ),
        micro_batch_size=setup.micro_batch_size,
        student_optimizer=optimizer,
        teacher_optimizer=optimizer if method == "vpd" else None,
        seed=seed,
        task=ArithmeticTask(**setup.task),
    )


def run_one(setup: Setup, method: str, lr: float, seed: int, accelerator: str) -> dict:
    """Validate the untrained model, train `setup.steps` steps with validation every
    `setup.eval_every`, and return the curves (the pre-training point is step 0)."""
    pl.seed_everything(seed, workers=True, verbose=False)
    start = time.perf_counter()
    module = build_module(setup, method, lr, seed)
    data = VPDDataModule(
        module.task,
        prompts_per_step=setup.prompts_per_step,
        val_size=setup.val_size,
        val_batch_size=16,
        seed=seed,
    )
    recorder, logger = CurveRecorder(), StepLogger()
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator=accelerator,
            devices=1,
            max_steps=setup.steps,
            val_check_interval=setup.eval_every,
            check_val_every_n_epoch=None,
            num_sanity_val_steps=0,
            logger=logger,
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[recorder],
            default_root_dir=root,
        )
        trainer.validate(module, datamodule=data, verbose=False)
        trainer.fit(module, datamodule=data)
    curve = train_curve(logger, recorder)
    before, *during = recorder.val
    final = during[-1] if during and during[-1]["step"] == setup.steps else None
    return {
        "method": method,
        "lr": lr,
        "seed": seed,
        "before": before,
        "after": final,
        "val_curve": recorder.val,
        "train_curve": curve,
        "train_seconds": curve[-1]["train_seconds"] if curve else 0.0,
        "total_seconds": time.perf_counter() - start,
    }


def warm_up(setup: Setup, method: str, accelerator: str) -> None:
    """One discarded step before the timed runs: the first step in a process pays one-off costs
    (about a minute on the CPU here: the verifier's worker pool, first generate call), which
    would otherwise land on whichever method runs first."""
    run_one(replace(setup, steps=1, eval_every=1, val_size=1), method, 1e-4, 0, accelerator)


def late_reward(run: dict) -> float:
    """Mean training reward over the second half of the steps: the lr-selection criterion."""
    rewards = [row["train/reward_mean"] for row in run["train_curve"]]
    return statistics.fmean(rewards[len(rewards) // 2 :]) if rewards else float("nan")


def select_lrs(runs: list[dict], methods: list[str]) -> dict[str, float]:
    """Per method, the lr whose runs (averaged over seeds) have the best late training reward."""
    chosen = {}
    for method in methods:
        by_lr: dict[float, list[float]] = {}
        for run in runs:
            if run["method"] == method:
                by_lr.setdefault(run["lr"], []).append(late_reward(run))
        chosen[method] = max(by_lr, key=lambda lr: statistics.fmean(by_lr[lr]))
    return chosen


def spread(values: list[float]) -> dict:
    """Mean and (for more than one seed) sample standard deviation."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def summarize(runs: list[dict], chosen: dict[str, float]) -> list[dict]:
    """One row per method at its chosen lr, aggregated over seeds."""
    rows = []
    for method, lr in chosen.items():
        picked = [r for r in runs if r["method"] == method and r["lr"] == lr and r["after"]]
        if not picked:
            continue
        row = {
            "method": method,
            "lr": lr,
            "seeds": [r["seed"] for r in picked],
            "before": spread([r["before"]["val/mean@1"] for r in picked]),
            "after": spread([r["after"]["val/mean@1"] for r in picked]),
            "late_train_reward": spread([late_reward(r) for r in picked]),
            "train_seconds": spread([r["train_seconds"] for r in picked]),
        }
        if method == "vpd":
            row["teacher_before"] = spread([r["before"]["val/teacher_mean@1"] for r in picked])
            row["teacher_after"] = spread([r["after"]["val/teacher_mean@1"] for r in picked])
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The README table: held-out greedy accuracy before/after, late train reward, time."""

    def fmt(stat: dict | None) -> str:
        if stat is None:
            return "-"
        text = f"{stat['mean']:.3f}"
        return text + (f" ± {stat['std']:.3f}" if stat["std"] is not None else "")

    lines = [
        "| method | lr | seeds | held-out before | held-out after | VPD teacher before → after "
        "| train reward (2nd half) | train time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        teacher = (
            f"{fmt(row['teacher_before'])} → {fmt(row['teacher_after'])}"
            if "teacher_after" in row
            else "-"
        )
        lines.append(
            f"| {row['method']} | {row['lr']:g} | {len(row['seeds'])} | {fmt(row['before'])} "
            f"| {fmt(row['after'])} | {teacher} | {fmt(row['late_train_reward'])} "
            f"| {row['train_seconds']['mean']:.0f} |"
        )
    return "\n".join(lines)


def plot(runs: list[dict], chosen: dict[str, float], path: Path) -> None:
    """Train reward and held-out accuracy against steps and against training wall-clock.
    Chosen-lr runs are solid, the other sweep runs dotted; VPD's teacher is dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharey="row")
    colors = {"grpo": "tab:blue", "sdpo": "tab:orange", "vpd": "tab:green"}
    for run in runs:
        method = run["method"]
        solid = chosen.get(method) == run["lr"]
        style = dict(
            color=colors.get(method, "gray"),
            linestyle="-" if solid else ":",
            alpha=1.0 if solid else 0.6,
            label=f"{method} lr={run['lr']:g} seed={run['seed']}",
        )
        train, val = run["train_curve"], run["val_curve"]
        for col, x in enumerate(("step", "train_seconds")):
            axes[0, col].plot(
                [r[x] for r in train], [r["train/reward_mean"] for r in train], **style
            )
            axes[1, col].plot(
                [r[x] for r in val], [r["val/mean@1"] for r in val], marker="o", **style
            )
            if method == "vpd" and solid:
                teacher = [r for r in val if "val/teacher_mean@1" in r]
                axes[1, col].plot(
                    [r[x] for r in teacher],
                    [r["val/teacher_mean@1"] for r in teacher],
                    color=style["color"],
                    linestyle="--",
                    marker="x",
                    label=f"vpd teacher lr={run['lr']:g} seed={run['seed']}",
                )
    for col, xlabel in enumerate(("training step", "training wall-clock (s)")):
        axes[0, col].set_xlabel(xlabel)
        axes[1, col].set_xlabel(xlabel)
    axes[0, 0].set_ylabel("train reward (mean over rollouts)")
    axes[1, 0].set_ylabel("held-out accuracy (greedy mean@1)")
    axes[1, 1].legend(fontsize=7, loc="best")
    fig.suptitle("SmolLM2-135M-Instruct + LoRA, arithmetic with diagnostic feedback")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def lr_notes(lrs: list[float]) -> list[str]:
    """Say so when the sweep was a single value (the CPU default, for time)."""
    if len(lrs) > 1:
        return []
    return [
        f"No learning-rate sweep in this run: one fixed lr={lrs[0]:g} for every method (student "
        "and, for VPD, teacher), a middle value for LoRA on a 135M model, because a 2-lr sweep "
        "did not fit the CPU time budget. Pass --lrs A B to sweep (selection by late train "
        "reward)."
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--methods", nargs="+", default=["grpo", "sdpo", "vpd"])
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-4])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--eval-every", type=int, default=3)
    parser.add_argument("--val-size", type=int, default=32)
    parser.add_argument("--device", default="auto", help="Lightning accelerator: auto, cpu, gpu")
    parser.add_argument("--output", type=Path, default=RESULTS / "compare-cpu.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    setup = Setup(
        model=args.model, steps=args.steps, eval_every=args.eval_every, val_size=args.val_size
    )
    warm_up(setup, args.methods[0], args.device)
    started = time.perf_counter()
    runs = []
    for seed in args.seeds:
        for lr in args.lrs:
            for method in args.methods:
                run = run_one(setup, method, lr, seed, args.device)
                runs.append(run)
                after = run["after"]["val/mean@1"] if run["after"] else float("nan")
                print(
                    f"[{time.perf_counter() - started:7.0f}s] {method} lr={lr:g} seed={seed}: "
                    f"held-out {run['before']['val/mean@1']:.3f} -> {after:.3f}, "
                    f"late train reward {late_reward(run):.3f}",
                    flush=True,
                )
    chosen = select_lrs(runs, args.methods)
    rows = summarize(runs, chosen)
    result = {
        "setup": asdict(setup),
        "methods": args.methods,
        "lr_sweep": {
            "lrs": args.lrs,
            "criterion": "mean train reward over the second half of the steps (no held-out data)",
            "chosen": chosen,
            "late_train_reward": [
                {"method": r["method"], "lr": r["lr"], "seed": r["seed"], "value": late_reward(r)}
                for r in runs
            ],
        },
        "seeds": args.seeds,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "summary": rows,
        "runs": runs,
        "total_seconds": time.perf_counter() - started,
        "notes": NOTES + lr_notes(args.lrs),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    plot(runs, chosen, args.output.with_suffix(".png"))
    print(markdown_table(rows))
    print(f"wrote {args.output} and {args.output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
