"""The README's results section, rendered from the committed JSON in benchmarks/results/.

The README's numbers are never typed by hand: this script renders them, and a test checks that
the README holds exactly what it renders.

    .venv/bin/python benchmarks/report.py                 # print the section
    .venv/bin/python benchmarks/report.py --write-readme  # replace it in README.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_kernels import precision_markdown
from compare_methods import late_reward
from compare_methods import markdown_table as compare_table
from train_step import markdown_table as train_step_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def sweep_table(compare: dict) -> str:
    """Late training reward (the selection criterion) and held-out accuracy of every sweep run."""
    sweep = compare["lr_sweep"]
    lrs, seed = sweep["lrs"], sweep["seed"]
    lines = [
        "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
        "|---|" + "---|" * len(lrs),
    ]
    for method, chosen in sweep["chosen"].items():
        cells = []
        for lr in lrs:
            run = next(
                (
                    r
                    for r in compare["runs"]
                    if r["method"] == method and r["lr"] == lr and r["seed"] == seed
                ),
                None,
            )
            if run is None:
                cells.append("-")
                continue
            mark = " **chosen**" if lr == chosen else ""
            cells.append(f"{late_reward(run):.3f} / {run['held_out_mean']:.3f}{mark}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def probe_lines(probe: dict | None) -> list[str]:
    """What the untrained model makes of the feedback (compare_methods.feedback_probe)."""
    if probe is None:
        return []
    return [
        f"Feedback probe, before training: of the {probe['student_wrong']} held-out prompts "
        f"(of {probe['held_out_size']}) that the student answers wrongly, the same model shown "
        f"the verifier's feedback on its attempt answers {probe['repaired']} right; "
        f"{probe['repeats_wrong_answer']} of its answers repeat the wrong answer that the "
        "feedback quotes.",
        "",
    ]


def compare_section(compare: dict, device: str) -> list[str]:
    s = compare["setup"]
    minutes = compare["total_seconds"] / 60
    task = s["task"]
    out = [
        f"#### GRPO vs SDPO vs VPD ({device})",
        "",
        f"`benchmarks/compare_methods.py`: {s['model']} with LoRA r={s['lora_r']}, arithmetic "
        f"({task['num_ops']} operations of {task['operations']}, operands <= "
        f"{task['max_operand']}, {task['feedback']} feedback), {s['steps']} steps of "
        f"{s['prompts_per_step']} prompts x {s['num_generations']} rollouts "
        f"({compare['rollout_budget']} rollouts per run, every method), VPD E-step every "
        f"{s['estep_every']} steps; held-out: greedy accuracy on {s['val_size']} fixed test "
        f"prompts; seeds {', '.join(map(str, compare['seeds']))} (variants: "
        f"{', '.join(map(str, compare['variant_seeds']))}); {minutes:.0f} min on "
        f"{compare['cpu_count']} CPU cores.",
        "",
        compare_table(compare["summary"]),
        "",
        *probe_lines(compare.get("feedback_probe")),
        f"![learning curves](benchmarks/results/compare-{device}.png)",
        "",
        f"Learning-rate sweep (seed {compare['lr_sweep']['seed']}): late train reward / held-out "
        "after; the choice uses the train reward only.",
        "",
        sweep_table(compare),
        "",
    ]
    out += [f"- {note}" for note in compare["notes"]]
    return out


def train_step_section(train_step: dict) -> list[str]:
    tokens = {r["model"]: r["completion_tokens"] for r in train_step["results"]}
    sizes = ", ".join(f"{m}: {n:.0f}" for m, n in tokens.items())
    out = [
        "#### One VPD step: fused against eager losses (CPU)",
        "",
        "`benchmarks/train_step.py`: tokens per second and peak memory of each phase of one VPD "
        f"step (completion tokens per step: {sizes}).",
        "",
        train_step_table(train_step["results"]),
        "",
    ]
    out += [f"- {note}" for note in train_step["notes"]]
    return out


def kernels_section(kernels: dict) -> list[str]:
    c = kernels["config"]
    lines = [
        f"#### The losses alone ({kernels['device']})",
        "",
        f"`benchmarks/bench_kernels.py`: {c['workload']}, N={c['n']} tokens, V={c['v']}, "
        f"{c['dtype']}, median of {c['repeats']}; peak memory above the inputs.",
        "",
        "| inputs | method | time (ms) | x vpd_kernels | peak extra (MB) | x hardware floor |",
        "|---|---|---|---|---|---|",
    ]
    for row in kernels["results"]:
        if row["status"] != "ok":
            lines.append(f"| {row['mode']} | {row['method']} | {row['status']} | | | |")
            continue
        floor = f"{row['ratio_to_floor']:.2f}" if "ratio_to_floor" in row else "-"
        ratio = f"{row['ratio_to_vpd']:.2f}" if "ratio_to_vpd" in row else "-"
        lines.append(
            f"| {row['mode']} | {row['method']} | {row['time_ms']:.0f} | {ratio} "
            f"| {row['peak_extra_mb']:.0f} | {floor} |"
        )
    if "precision" in kernels:
        lines += ["", "Precision: " + precision_markdown(kernels)]
    return lines


def render() -> str:
    """The whole section between the README's markers."""
    sections: list[list[str]] = []
    for device in ("cpu", "h100", "h200"):
        compare = load(f"compare-{device}.json")
        if compare is not None:
            sections.append(compare_section(compare, device))
    train_step = load("train-step-cpu.json")
    if train_step is not None:
        sections.append(train_step_section(train_step))
    for path in sorted(RESULTS.glob("kernels-*.json")):
        sections.append(kernels_section(json.loads(path.read_text())))
    return "\n\n".join("\n".join(lines).strip("\n") for lines in sections) + "\n"


def readme_section(readme: str) -> str:
    """What the README currently holds between the markers."""
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"README.md lacks the {BEGIN} ... {END} markers")
    return readme[readme.index(BEGIN) + len(BEGIN) : readme.index(END)].strip("\n") + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()
    section = render()
    if not args.write_readme:
        print(section, end="")
        return
    path = ROOT / "README.md"
    readme = path.read_text()
    readme_section(readme)  # checks the markers
    head, tail = readme.split(BEGIN)[0], readme.split(END)[1]
    path.write_text(f"{head}{BEGIN}\n{section}{END}{tail}")
    print(f"updated {path}")


if __name__ == "__main__":
    main()
