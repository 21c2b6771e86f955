"""The method comparison's results: per-run and baseline measures, the summary (per arm and per
paired difference, intervals across seeds and within them), its markdown tables and its figure."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from power import t_interval
from study_design import ARMS, COMPARISONS, FEEDBACKS, Setup, task_text


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
    seed_means = [mean_of([rows[s]]) for s in sorted(rows)]
    return {
        "mean": statistics.fmean(seed_means) if seed_means else float("nan"),
        "ci95": t_interval(seed_means),
        "seeds_tie": seeds_tie(seed_means),
        "seed_means": seed_means,
        "within_seed_ci95": [t_interval(rows[s]) for s in sorted(rows)],
    }


def seeds_tie(seed_means: list[float]) -> bool:
    """Whether two or more seeds share one value (2 seeds of a measure on a grid of items, such
    as a repair rate over 32 items, can): their t-interval has width 0, measures no spread and so
    shows nothing."""
    if len(seed_means) < 2:
        return False
    scale = max(1.0, *(abs(m) for m in seed_means))
    return max(seed_means) - min(seed_means) <= 1e-9 * scale  # equal up to float rounding


def summarize(setup: Setup, base: dict, runs: list[dict]) -> dict:
    """Per arm and measure: mean and intervals; per comparison, over the seeds both arms ran:
    the paired difference (item by item within a seed, then across seeds)."""
    by_arm: dict[str, dict[int, dict[str, list[float]]]] = {}
    for run in runs:
        by_arm.setdefault(run["arm"], {})[run["seed"]] = run_measures(run, setup.steps)
    summary: dict = {"before": {}, "arms": {}, "differences": []}
    for measure, values in baseline_measures(base).items():  # one model: over items
        summary["before"][measure] = {"mean": mean_of([values]), "ci95": t_interval(values)}
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
                    "seeds_tie": stats["seeds_tie"],
                    "excludes_0": not stats["seeds_tie"] and (low > 0 or high < 0),
                }
            )
    return summary


def mean_of(matrix: list[list[float]]) -> float:
    values = [x for row in matrix for x in row]
    return statistics.fmean(values) if values else float("nan")


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


TIE = "†"
"""Marks a value whose seeds tie exactly (`seeds_tie`)."""


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
        tie = TIE if stat.get("seeds_tie") else ""
        return f"{stat['mean']:.3f} [{stat['ci95'][0]:.3f}, {stat['ci95'][1]:.3f}]{tie}"

    stats_shown = summary["differences"] + [
        stat for stats in summary["arms"].values() for stat in stats.values()
    ]
    tie_note = (
        f"; {TIE}: the seeds tie exactly, so the interval measures no spread and is never bold"
        if any(stat.get("seeds_tie") for stat in stats_shown)
        else ""
    )
    lines.append(
        "| before training | - | " + " | ".join(cell(summary["before"][m]) for m in shown) + " |"
    )
    for arm, stats in summary["arms"].items():
        seeds = len(stats["student_accuracy"]["seed_means"])
        lines.append(f"| {arm} | {seeds} | " + " | ".join(cell(stats[m]) for m in shown) + " |")
    lines += [
        "",
        f"Paired differences after {setup['steps']} steps ({interval_kind(result)}; **bold**: "
        f"the interval excludes 0{tie_note}):",
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
            if d.get("seeds_tie"):
                text += TIE
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
                mean_of([r["teacher_margin_curve"][str(s)][feedback] for r in runs])
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
