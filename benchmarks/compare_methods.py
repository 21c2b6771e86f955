"""GRPO, SDPO and VPD on SmolLM2-135M-Instruct + LoRA: arithmetic with two operations and
diagnostic feedback, which says where an attempt went wrong (information the 0/1 reward lacks).

Variants (the JSON's keys): `grpo`, `sdpo` (its reference code's settings: sibling solution +
feedback reprompt, EMA teacher, top-100 + tail, JSD 0.5), `vpd` (shared teacher: each E-step also
moves the student's weights), `vpd-adapter` (the teacher is its own LoRA adapter) and
`vpd-fixed-prior` (the E-step anchored to the initial student: the paper's ablation). Every run
has the same rollout budget: steps x prompts per step x rollouts per prompt.

Two phases. The sweep: grpo, sdpo and vpd run at every `--lrs` value with the first seed, and each
keeps the lr with the highest mean *training* reward over the second half of its steps (the
held-out set plays no part; the two VPD variants take VPD's lr, so each differs from it in one
setting). Then grpo, sdpo and vpd run at their lr with the other `--seeds`, the variants with
`--variant-seeds`.

Held-out: the first `--val-size` prompts of the task's test split, fixed before any training and
the same for every run, answered greedily once before training (LoRA starts as the identity, so
every run starts from the same model) and once after. Each method's mean comes with a 95%
bootstrap interval that resamples seeds and prompts; differences between methods resample the
same prompts for both (paired) and seeds independently.

    .venv/bin/python benchmarks/compare_methods.py            # the CPU run (see the JSON's time)
    .venv/bin/python benchmarks/compare_methods.py --model builtin:tiny-random --steps 2 \
        --val-size 4 --lrs 1e-3 --seeds 0 --output /tmp/compare-smoke.json

Writes the JSON (setup, every run with its per-prompt held-out rewards and curves, the summary
with intervals, timings, notes), a PNG next to it, and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger

from vpd_lightning.options import DistillOptions, EStepOptions, LoraOptions, RolloutOptions
from vpd_lightning.rollout import TeacherContextBuilder, render_prompt
from vpd_lightning.rollout.engine import SamplingParams
from vpd_lightning.rollout.sampling import sample_and_verify
from vpd_lightning.tasks import ArithmeticTask, Verdict
from vpd_lightning.trainer.data import VPDDataModule
from vpd_lightning.trainer.module import VPDModule

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
SWEPT = ("grpo", "sdpo", "vpd")
VARIANT_OF = {"vpd-adapter": "vpd", "vpd-fixed-prior": "vpd"}  # variant -> whose lr it takes
METHODS = (*SWEPT, *VARIANT_OF)
COMPARISONS = (
    ("vpd", "grpo"),
    ("vpd", "sdpo"),
    ("sdpo", "grpo"),
    ("vpd-adapter", "vpd"),
    ("vpd-fixed-prior", "vpd"),
)
BOOTSTRAP_SAMPLES = 4000
NOTES = [
    "lr: each of grpo, sdpo and vpd keeps the lr with the best mean training reward over the "
    "second half of its steps, on the first seed; vpd-adapter and vpd-fixed-prior take vpd's.",
    "A seed changes the LoRA initialisation, the order of training prompts and the rollout "
    "sampling, not the held-out prompts.",
    "Intervals are 95% percentile bootstraps: seeds and prompts resampled with replacement; for "
    "a difference the same prompts are drawn for both methods. With one seed an interval covers "
    "prompt sampling only.",
    "Wall-clock counts training only (rollouts and updates), not held-out evaluation.",
]


@dataclass
class Setup:
    """Everything shared by the methods; recorded in the JSON."""

    model: str
    steps: int
    val_size: int
    prompts_per_step: int = 4
    num_generations: int = 4
    max_new_tokens: int = 64
    temperature: float = 0.8
    lora_r: int = 16
    lora_alpha: int = 32
    estep_every: int = 3
    micro_batch_size: int = 8
    max_context_tokens: int = 128
    task: dict = field(
        default_factory=lambda: dict(
            num_ops=2,
            max_operand=10,
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


class StepTimer(pl.Callback):
    """Training wall-clock (rollouts and updates) at the end of each step."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}
        self._total = 0.0
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._total += time.perf_counter() - self._start
        self.seconds[trainer.global_step] = self._total


def build_module(setup: Setup, variant: str, lr: float, seed: int) -> VPDModule:
    """One variant's module; VPD's teacher optimizer is the student's (same class and lr)."""
    method = VARIANT_OF.get(variant, variant)
    return VPDModule(
        model=setup.model,
        method=method,
        teacher_mode="adapter" if variant == "vpd-adapter" else "shared",
        lora=LoraOptions(r=setup.lora_r, alpha=setup.lora_alpha),
        max_context_tokens=setup.max_context_tokens,
        rollout=RolloutOptions(
            num_generations=setup.num_generations,
            temperature=setup.temperature,
            max_new_tokens=setup.max_new_tokens,
        ),
        # SDPO's reference default is JSD(0.5); VPD's M-step is the paper's reverse KL.
        distill=DistillOptions(divergence="jsd") if method == "sdpo" else DistillOptions(),
        estep=EStepOptions(
            every=setup.estep_every,
            prior="initial" if variant == "vpd-fixed-prior" else "student",
        ),
        micro_batch_size=setup.micro_batch_size,
        student_optimizer=lambda params: torch.optim.AdamW(params, lr=lr),
        seed=seed,
        task=ArithmeticTask(**setup.task),
    )


def held_out_records(setup: Setup) -> list[dict]:
    """The fixed held-out prompts: the first `val_size` of the test split."""
    records = ArithmeticTask(**setup.task).records("test")
    if len(records) < setup.val_size:
        raise ValueError(f"the test split has {len(records)} prompts, fewer than {setup.val_size}")
    return records[: setup.val_size]


@torch.no_grad()
def answer_greedily(
    module: VPDModule, records: list[dict], prompts: list[list[int]], setup: Setup
) -> tuple[list[str], list[Verdict]]:
    """The student's greedy response to each prompt and its verdict against the prompt's record,
    32 prompts at a time."""
    params = SamplingParams(
        num_samples=1, temperature=0.0, top_p=1.0, max_new_tokens=setup.max_new_tokens, seed=0
    )
    texts: list[str] = []
    verdicts: list[Verdict] = []
    with module.policy.student():
        for start in range(0, len(records), 32):
            end = start + 32
            attempts = sample_and_verify(
                module.engine,
                module.tokenizer,
                module.task,
                records[start:end],
                prompts[start:end],
                params,
                1,
            )
            texts += attempts.texts
            verdicts += attempts.verdicts
    return texts, verdicts


def held_out_answers(module: VPDModule, setup: Setup) -> tuple[list[str], list[Verdict]]:
    """The student's greedy answers to the fixed held-out prompts, in order."""
    records = held_out_records(setup)
    prompts = [render_prompt(module.tokenizer, r) for r in records]
    return answer_greedily(module, records, prompts, setup)


def feedback_probe(
    module: VPDModule, texts: list[str], verdicts: list[Verdict], setup: Setup
) -> dict:
    """Before training, is the feedback usable by this model? On the held-out prompts the student
    answered wrongly (`texts`, `verdicts`: its greedy answers), the same model answers again shown
    the verifier's feedback on its attempt (`val/teacher_repair_rate`'s context): how many it now
    gets right, and how many answers just repeat the wrong answer that the feedback quotes."""
    records = held_out_records(setup)
    wrong = [i for i, v in enumerate(verdicts) if v.reward < 1.0]
    builder = TeacherContextBuilder(
        module.tokenizer, source="verifier", max_context_tokens=setup.max_context_tokens
    )
    contexts = builder.build_batch(
        [records[i] for i in wrong], [[texts[i]] for i in wrong], [[verdicts[i]] for i in wrong]
    )
    _, again = answer_greedily(
        module, [records[i] for i in wrong], [c.prompt_ids for (c,) in contexts], setup
    )
    repeats = sum(
        v.info.get("answer") is not None and v.info.get("answer") == verdicts[i].info.get("answer")
        for i, v in zip(wrong, again, strict=True)
    )
    return {
        "held_out_size": len(records),
        "student_wrong": len(wrong),
        "repaired": sum(v.reward >= 1.0 for v in again),
        "repeats_wrong_answer": repeats,
    }


def run_one(setup: Setup, variant: str, lr: float, seed: int, accelerator: str) -> dict:
    """Train `setup.steps` steps and answer the held-out prompts; returns the run's record."""
    pl.seed_everything(seed, workers=True, verbose=False)
    start = time.perf_counter()
    module = build_module(setup, variant, lr, seed)
    data = VPDDataModule(
        module.task, prompts_per_step=setup.prompts_per_step, val_size=1, seed=seed
    )
    timer, logger = StepTimer(), StepLogger()
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
            callbacks=[timer],
            default_root_dir=root,
        )
        trainer.fit(module, datamodule=data)
    curve = [
        {"step": step, "train_seconds": seconds, **logger.rows.get(step, {})}
        for step, seconds in sorted(timer.seconds.items())
    ]
    rewards = [v.reward for v in held_out_answers(module, setup)[1]]
    return {
        "method": variant,
        "lr": lr,
        "seed": seed,
        "steps": trainer.global_step,
        "held_out_size": len(rewards),
        "held_out_mean": statistics.fmean(rewards),
        "held_out": rewards,
        "train_curve": curve,
        "train_seconds": curve[-1]["train_seconds"] if curve else 0.0,
        "total_seconds": time.perf_counter() - start,
    }


def late_reward(run: dict) -> float:
    """Mean training reward over the second half of the steps: the lr-selection criterion."""
    rewards = [row["train/reward_mean"] for row in run["train_curve"]]
    return statistics.fmean(rewards[len(rewards) // 2 :]) if rewards else float("nan")


def select_lrs(runs: list[dict], methods: list[str]) -> dict[str, float]:
    """Per swept method, the lr whose sweep run has the best late training reward; a variant
    takes the lr of the method it varies."""
    chosen = {}
    for method in (m for m in methods if m in SWEPT):
        by_lr = {run["lr"]: late_reward(run) for run in runs if run["method"] == method}
        chosen[method] = max(by_lr, key=by_lr.get)
    for method in (m for m in methods if m in VARIANT_OF):
        chosen[method] = chosen[VARIANT_OF[method]]
    return chosen


def _resampled_mean(matrix: list[list[float]], seeds: list[int], prompts: list[int]) -> float:
    return statistics.fmean(matrix[s][p] for s in seeds for p in prompts)


def bootstrap(
    a: list[list[float]], b: list[list[float]] | None = None, samples: int = BOOTSTRAP_SAMPLES
) -> list[float]:
    """95% percentile interval of mean(a) (or of mean(a) - mean(b)); a and b are seeds x prompts
    reward matrices over the same prompts. Seeds are resampled per matrix, prompts once for both."""
    rng = random.Random(0)
    n_prompts = len(a[0])
    values = []
    for _ in range(samples):
        prompts = [rng.randrange(n_prompts) for _ in range(n_prompts)]
        value = _resampled_mean(a, [rng.randrange(len(a)) for _ in a], prompts)
        if b is not None:
            value -= _resampled_mean(b, [rng.randrange(len(b)) for _ in b], prompts)
        values.append(value)
    values.sort()
    return [values[int(0.025 * samples)], values[int(0.975 * samples) - 1]]


def chosen_runs(runs: list[dict], method: str, lr: float) -> list[dict]:
    return sorted(
        (r for r in runs if r["method"] == method and r["lr"] == lr), key=lambda r: r["seed"]
    )


def summarize(runs: list[dict], chosen: dict[str, float], before: list[float]) -> dict:
    """Per method (at its lr): held-out mean over seeds with its interval; and the differences."""
    rows, matrices = [], {}
    for method, lr in chosen.items():
        picked = chosen_runs(runs, method, lr)
        if not picked:
            continue
        matrices[method] = [r["held_out"] for r in picked]
        means = [r["held_out_mean"] for r in picked]
        rows.append(
            {
                "method": method,
                "lr": lr,
                "seeds": [r["seed"] for r in picked],
                "steps": picked[0]["steps"],
                "held_out_size": picked[0]["held_out_size"],
                "mean": statistics.fmean(means),
                "ci95": bootstrap(matrices[method]),
                "seed_means": means,
                "late_train_reward": statistics.fmean(late_reward(r) for r in picked),
                "train_seconds": statistics.fmean(r["train_seconds"] for r in picked),
            }
        )
    rows_by_method = {row["method"]: row for row in rows}
    differences = []
    for a, b in COMPARISONS:
        if a in matrices and b in matrices:
            low, high = bootstrap(matrices[a], matrices[b])
            diff = rows_by_method[a]["mean"] - rows_by_method[b]["mean"]
            differences.append(
                {
                    "a": a,
                    "b": b,
                    "difference": diff,
                    "ci95": [low, high],
                    "excludes_0": low > 0 or high < 0,
                }
            )
    return {
        "before": {"mean": statistics.fmean(before), "ci95": bootstrap([before])},
        "methods": rows,
        "differences": differences,
    }


def markdown_table(summary: dict) -> str:
    """Held-out accuracy per method with its interval, then the differences."""
    before = summary["before"]
    lines = [
        "| method | lr | seeds | held-out after [95% CI] | per seed | train reward (2nd half) "
        "| train time (s) |",
        "|---|---|---|---|---|---|---|",
        f"| before training | - | - | {before['mean']:.3f} [{before['ci95'][0]:.3f}, "
        f"{before['ci95'][1]:.3f}] | - | - | - |",
    ]
    for row in summary["methods"]:
        low, high = row["ci95"]
        per_seed = ", ".join(f"{m:.3f}" for m in row["seed_means"])
        lines.append(
            f"| {row['method']} | {row['lr']:g} | {len(row['seeds'])} | {row['mean']:.3f} "
            f"[{low:.3f}, {high:.3f}] | {per_seed} | {row['late_train_reward']:.3f} "
            f"| {row['train_seconds']:.0f} |"
        )
    lines += [
        "",
        "| difference | held-out accuracy [95% CI] | interval excludes 0 |",
        "|---|---|---|",
    ]
    for d in summary["differences"]:
        low, high = d["ci95"]
        verdict = "yes" if d["excludes_0"] else "no"
        lines.append(
            f"| {d['a']} − {d['b']} | {d['difference']:+.3f} [{low:+.3f}, {high:+.3f}] | {verdict} |"
        )
    return "\n".join(lines)


def mean_curve(runs: list[dict], key: str) -> tuple[list, list, list, list, list]:
    """Steps, mean training seconds, and mean/min/max of `key` over runs, at the steps all have."""
    steps = sorted(
        set.intersection(*({r["step"] for r in run["train_curve"] if key in r} for run in runs))
    )
    rows = [[next(r for r in run["train_curve"] if r["step"] == s) for run in runs] for s in steps]
    seconds = [statistics.fmean(r["train_seconds"] for r in at) for at in rows]
    values = [[r[key] for r in at] for at in rows]
    means = [statistics.fmean(v) for v in values]
    return steps, seconds, means, [min(v) for v in values], [max(v) for v in values]


def plot(result: dict, path: Path, title: str) -> None:
    """Training reward against steps and wall-clock (mean over seeds, min-max band) and held-out
    accuracy with its bootstrap interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = ("tab:blue", "tab:orange", "tab:green", "tab:olive", "tab:purple")
    colors = dict(zip(METHODS, palette, strict=True))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    chosen = result["lr_sweep"]["chosen"]
    for method, lr in chosen.items():
        picked = chosen_runs(result["runs"], method, lr)
        if not picked:
            continue
        steps, seconds, mean, low, high = mean_curve(picked, "train/reward_mean")
        for ax, x in zip(axes[:2], (steps, seconds), strict=True):
            ax.plot(x, mean, color=colors[method], label=f"{method} (n={len(picked)})")
            if len(picked) > 1:
                ax.fill_between(x, low, high, color=colors[method], alpha=0.12)
    rows = result["summary"]["methods"]
    names = ["before", *(row["method"] for row in rows)]
    stats = [result["summary"]["before"], *rows]
    means = [s["mean"] for s in stats]
    errors = [
        [m - s["ci95"][0] for m, s in zip(means, stats, strict=True)],
        [s["ci95"][1] - m for m, s in zip(means, stats, strict=True)],
    ]
    axes[2].bar(
        names, means, yerr=errors, capsize=4, color=["gray", *(colors[n] for n in names[1:])]
    )
    axes[0].set_xlabel("training step")
    axes[1].set_xlabel("training wall-clock (s)")
    for ax in axes[:2]:
        ax.set_ylabel("train reward (mean over rollouts)")
    axes[0].legend(fontsize=8)
    axes[2].set_ylabel(f"held-out greedy accuracy, {stats[-1]['held_out_size']} prompts (95% CI)")
    axes[2].tick_params(axis="x", labelrotation=20)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_title(setup: Setup) -> str:
    model = setup.model.removeprefix("builtin:")
    return (
        f"{model} + LoRA r={setup.lora_r}: arithmetic, {setup.task['num_ops']} operations, "
        f"{setup.task['feedback']} feedback; {setup.steps} steps"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--lrs", nargs="+", type=float, default=[5e-5, 1.5e-4])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variant-seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--val-size", type=int, default=128)
    parser.add_argument("--device", default="auto", help="Lightning accelerator: auto, cpu, gpu")
    parser.add_argument("--output", type=Path, default=RESULTS / "compare-cpu.json")
    parser.add_argument("--replot", type=Path, help="only redraw the PNG of this JSON")
    parser.add_argument(
        "--probe-only", type=Path, help="only add the feedback probe to this JSON (same setup)"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.replot:
        result = json.loads(args.replot.read_text())
        plot(result, args.replot.with_suffix(".png"), plot_title(Setup(**result["setup"])))
        return
    if args.probe_only:
        result = json.loads(args.probe_only.read_text())
        setup = Setup(**result["setup"])
        module = build_module(setup, "vpd", 1e-4, 0)
        result["feedback_probe"] = feedback_probe(module, *held_out_answers(module, setup), setup)
        args.probe_only.write_text(json.dumps(result, indent=1) + "\n")
        print(result["feedback_probe"])
        return
    setup = Setup(model=args.model, steps=args.steps, val_size=args.val_size)
    started = time.perf_counter()
    # The untrained model (LoRA's B = 0) on the held-out prompts; also pays the one-off costs of
    # a process's first generate call before any timed run.
    untrained = build_module(setup, "vpd", 1e-4, args.seeds[0])
    texts, verdicts = held_out_answers(untrained, setup)
    before = [v.reward for v in verdicts]
    probe = feedback_probe(untrained, texts, verdicts, setup)
    print(f"before training: held-out {statistics.fmean(before):.3f}; {probe}", flush=True)
    runs: list[dict] = []

    def run(method: str, lr: float, seed: int) -> None:
        result = run_one(setup, method, lr, seed, args.device)
        runs.append(result)
        print(
            f"[{time.perf_counter() - started:6.0f}s] {method} lr={lr:g} seed={seed}: held-out "
            f"{result['held_out_mean']:.3f}, late train reward {late_reward(result):.3f}, "
            f"train {result['train_seconds']:.0f}s",
            flush=True,
        )

    for lr in args.lrs:
        for method in (m for m in args.methods if m in SWEPT):
            run(method, lr, args.seeds[0])
    chosen = select_lrs(runs, args.methods)
    print("chosen lrs:", chosen, flush=True)
    for method in args.methods:
        for seed in args.variant_seeds if method in VARIANT_OF else args.seeds:
            if not any(
                r["method"] == method and r["lr"] == chosen[method] and r["seed"] == seed
                for r in runs
            ):
                run(method, chosen[method], seed)

    summary = summarize(runs, chosen, before)
    result = {
        "setup": asdict(setup),
        "methods": args.methods,
        "rollout_budget": setup.steps * setup.prompts_per_step * setup.num_generations,
        "lr_sweep": {
            "lrs": args.lrs,
            "seed": args.seeds[0],
            "criterion": "mean train reward over the second half of the steps (no held-out data)",
            "chosen": chosen,
        },
        "seeds": args.seeds,
        "variant_seeds": args.variant_seeds,
        "device": args.device,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "before": before,
        "feedback_probe": probe,
        "summary": summary,
        "runs": runs,
        "total_seconds": time.perf_counter() - started,
        "notes": NOTES,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.output.with_suffix(".png"), plot_title(setup))
    print(markdown_table(summary))
    print(f"wrote {args.output} and {args.output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
