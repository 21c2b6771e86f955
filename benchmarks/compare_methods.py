"""GRPO vs SDPO vs VPD on SmolLM2-135M-Instruct + LoRA, one-step arithmetic with diagnostic feedback.

Every method sees the same task, prompts per step, rollouts per prompt, steps, held-out set and
seeds; only `method` (and the learning rate, from a small sweep) changes. `vpd-fixed-prior` is
VPD with the E-step anchored to the initial student instead of the current one (the ablation).

Two phases. The sweep: every method except the ablation runs at every `--lrs` value with the
first seed, and each method keeps the lr with the highest mean *training* reward over the second
half of its steps, so the held-out set plays no part in the choice (the ablation takes VPD's).
Then every method runs at its lr with the remaining `--seeds`. All runs are in the JSON.

    .venv/bin/python benchmarks/compare_methods.py            # the CPU run (73 min on 2 cores)
    .venv/bin/python benchmarks/compare_methods.py --model builtin:tiny-random --steps 2 \
        --eval-every 1 --val-size 4 --lrs 1e-3 --seeds 0 --output /tmp/compare-smoke.json

Writes the JSON (config, seeds, every curve, timings, notes), a PNG next to it, and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger

from vpd_lightning.data import VPDDataModule
from vpd_lightning.module import VPDModule
from vpd_lightning.options import EStepOptions, LoraOptions, RolloutOptions, ValidationOptions
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
ABLATIONS = {"vpd-fixed-prior": "vpd"}  # ablation -> the method whose swept lr it reuses
NOTES = [
    "The lr sweep uses the first seed only; the other seeds run at the chosen lr. "
    "vpd-fixed-prior is not swept: it reuses VPD's lr, so the two differ only in the prior.",
    "Spread is the sample standard deviation over seeds; a seed changes the LoRA initialisation, "
    "the training prompts and the rollout sampling, not the held-out set.",
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


def build_module(setup: Setup, variant: str, lr: float, seed: int) -> VPDModule:
    """One method's module; the teacher optimizer (VPD's E-step) uses the student's lr."""

    def optimizer(params):
        return torch.optim.AdamW(params, lr=lr)

    method = ABLATIONS.get(variant, variant)
    prior = "initial" if variant == "vpd-fixed-prior" else "student"
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
        estep=EStepOptions(every=setup.estep_every, prior=prior),
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
    """Per method, the lr whose sweep run has the best late training reward; an ablation takes
    the lr of the method it ablates."""
    chosen = {}
    for method in methods:
        if method in ABLATIONS:
            continue
        by_lr = {run["lr"]: late_reward(run) for run in runs if run["method"] == method}
        chosen[method] = max(by_lr, key=by_lr.get)
    for method in methods:
        if method in ABLATIONS:
            chosen[method] = chosen[ABLATIONS[method]]
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
        if "val/teacher_mean@1" in picked[0]["before"]:
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


def mean_curve(runs: list[dict], curve: str, key: str) -> tuple[list, list, list, list]:
    """Steps, mean training seconds, and mean/min/max of `key` over runs, at the steps that
    every run has."""
    steps = sorted(set.intersection(*({r["step"] for r in run[curve] if key in r} for run in runs)))
    rows = [[next(r for r in run[curve] if r["step"] == s) for run in runs] for s in steps]
    seconds = [statistics.fmean(r["train_seconds"] for r in at) for at in rows]
    values = [[r[key] for r in at] for at in rows]
    return steps, seconds, [statistics.fmean(v) for v in values], values


def plot(runs: list[dict], chosen: dict[str, float], path: Path, title: str) -> None:
    """Train reward and held-out accuracy against steps and against training wall-clock: each
    method at its chosen lr, mean over seeds with a min-max band; VPD teachers dashed; sweep
    runs at the other lr dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharey="row")
    colors = {"grpo": "tab:blue", "sdpo": "tab:orange", "vpd": "tab:green"}
    colors["vpd-fixed-prior"] = "tab:purple"
    panels = (
        (0, "train_curve", "train/reward_mean", "-"),
        (1, "val_curve", "val/mean@1", "-"),
        (1, "val_curve", "val/teacher_mean@1", "--"),
    )
    for method, lr in chosen.items():
        picked = [r for r in runs if r["method"] == method and r["lr"] == lr]
        color = colors.get(method, "gray")
        for row, curve, key, linestyle in panels:
            if not picked or key not in picked[0][curve][0]:
                continue
            steps, seconds, mean, values = mean_curve(picked, curve, key)
            who = "teacher" if "teacher" in key else "student"
            label = f"{method} {who} lr={lr:g} (n={len(picked)})" if row else method
            for col, x in enumerate((steps, seconds)):
                axes[row, col].plot(
                    x,
                    mean,
                    color=color,
                    linestyle=linestyle,
                    marker=(None, "o", "x")[row + (who == "teacher")],
                    label=label,
                )
                if len(picked) > 1:
                    axes[row, col].fill_between(
                        x,
                        [min(v) for v in values],
                        [max(v) for v in values],
                        color=color,
                        alpha=0.12,
                    )
        for other in runs:
            if other["method"] == method and other["lr"] != lr:
                steps, seconds, mean, _ = mean_curve([other], "val_curve", "val/mean@1")
                axes[1, 0].plot(
                    steps,
                    mean,
                    color=color,
                    linestyle=":",
                    alpha=0.7,
                    label=f"{method} lr={other['lr']:g} (sweep)",
                )
    for col, xlabel in enumerate(("training step", "training wall-clock (s)")):
        axes[0, col].set_xlabel(xlabel)
        axes[1, col].set_xlabel(xlabel)
    axes[0, 0].set_ylabel("train reward (mean over rollouts)")
    axes[1, 0].set_ylabel("held-out accuracy (greedy mean@1)")
    axes[0, 0].legend(fontsize=8, loc="best")
    axes[1, 0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{title} (mean over seeds, band: min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_title(setup: Setup) -> str:
    model = setup.model.removeprefix("builtin:")
    return f"{model} + LoRA r={setup.lora_r}, arithmetic with {setup.task['feedback']} feedback"


def replot(path: Path) -> None:
    """Redraw the PNG of an earlier run from its JSON (after a change to the plot only)."""
    result = json.loads(path.read_text())
    setup = Setup(**result["setup"])
    plot(result["runs"], result["lr_sweep"]["chosen"], path.with_suffix(".png"), plot_title(setup))
    print(f"wrote {path.with_suffix('.png')}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--methods", nargs="+", default=["grpo", "sdpo", "vpd", "vpd-fixed-prior"])
    parser.add_argument("--lrs", nargs="+", type=float, default=[5e-5, 1.5e-4])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--val-size", type=int, default=32)
    parser.add_argument("--device", default="auto", help="Lightning accelerator: auto, cpu, gpu")
    parser.add_argument("--output", type=Path, default=RESULTS / "compare-cpu.json")
    parser.add_argument("--replot", type=Path, help="only redraw the PNG of this JSON")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.replot:
        replot(args.replot)
        return
    setup = Setup(
        model=args.model, steps=args.steps, eval_every=args.eval_every, val_size=args.val_size
    )
    warm_up(setup, args.methods[0], args.device)
    started = time.perf_counter()
    runs: list[dict] = []

    def run(method: str, lr: float, seed: int) -> None:
        result = run_one(setup, method, lr, seed, args.device)
        runs.append(result)
        after = result["after"]["val/mean@1"] if result["after"] else float("nan")
        print(
            f"[{time.perf_counter() - started:6.0f}s] {method} lr={lr:g} seed={seed}: held-out "
            f"{result['before']['val/mean@1']:.3f} -> {after:.3f}, late train reward "
            f"{late_reward(result):.3f}, train {result['train_seconds']:.0f}s",
            flush=True,
        )

    swept = [m for m in args.methods if m not in ABLATIONS]
    for lr in args.lrs:
        for method in swept:
            run(method, lr, args.seeds[0])
    chosen = select_lrs(runs, args.methods)
    print("chosen lrs:", chosen, flush=True)
    for seed in args.seeds:
        for method in args.methods:
            if not any(
                r["method"] == method and r["lr"] == chosen[method] and r["seed"] == seed
                for r in runs
            ):
                run(method, chosen[method], seed)

    rows = summarize(runs, chosen)
    result = {
        "setup": asdict(setup),
        "methods": args.methods,
        "lr_sweep": {
            "lrs": args.lrs,
            "seed": args.seeds[0],
            "criterion": "mean train reward over the second half of the steps (no held-out data)",
            "chosen": chosen,
            "late_train_reward": [
                {"method": r["method"], "lr": r["lr"], "seed": r["seed"], "value": late_reward(r)}
                for r in runs
                if r["seed"] == args.seeds[0]
            ],
        },
        "seeds": args.seeds,
        "device": args.device,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "summary": rows,
        "runs": runs,
        "total_seconds": time.perf_counter() - started,
        "notes": NOTES,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    plot(runs, chosen, args.output.with_suffix(".png"), plot_title(setup))
    print(markdown_table(rows))
    print(f"wrote {args.output} and {args.output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
