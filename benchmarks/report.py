"""The README's results section, rendered from the committed JSON in benchmarks/results/.

The README's numbers are never typed by hand: this script renders them, and a test checks that
the README holds exactly what it renders.

    .venv/bin/python benchmarks/report.py                 # print the section
    .venv/bin/python benchmarks/report.py --write-readme  # replace it in README.md (and the
                                                          # precision table in kernels/README.md)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_kernels import precision_markdown
from floor import markdown_table as floor_table
from study_design import PRIMARY, Setup, task_text
from study_summary import markdown_tables as compare_table
from train_step import markdown_table as train_step_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


MEASURE_NAMES = {
    "student_accuracy": "student accuracy",
    "student_logp_correct": "student log p(reference) per token",
    "student_bank_margin": "student bank margin (right minus wrong samples, nats per token)",
    "teacher_skill_diagnostic": "teacher skill with diagnostic feedback",
    "teacher_skill_binary": "teacher skill with binary feedback",
    "teacher_margin_diagnostic": "teacher margin with diagnostic feedback",
    "teacher_margin_binary": "teacher margin with binary feedback",
}


def reading(compare: dict) -> list[str]:
    """One sentence per paired difference: what its interval supports (generated, so it always
    says what the committed numbers say)."""
    lines = []
    for d in compare["summary"]["differences"]:
        low, high = d["ci95"]
        if d.get("seeds_tie"):
            verdict = "nothing is shown (the seeds tie exactly: no spread is measured)"
        elif low > 0:
            verdict = f"{d['a']} is higher"
        elif high < 0:
            verdict = f"{d['a']} is lower"
        else:
            verdict = "no difference is shown (the interval includes 0)"
        seeds = f" over {len(d['seeds'])} seeds" if "seeds" in d else ""
        lines.append(
            f"- {d['a']} − {d['b']}{seeds}, {MEASURE_NAMES[d['measure']]}: "
            f"{d['difference']:+.3f} [{low:+.3f}, {high:+.3f}]: {verdict}."
        )
    return lines


def calibration_lines(calibration: dict) -> list[str]:
    rule, choice = calibration["rule"], calibration["choice"]
    rows = [
        "| difficulty | " + " | ".join(f"{c} tokens" for c in rule["caps"]) + " |",
        "|---|" + "---|" * len(rule["caps"]),
    ]
    for row in calibration["candidates"]:
        cells = [
            f"{row['per_cap'][str(c)]['finished']:.2f} / {row['per_cap'][str(c)]['accuracy']:.2f}"
            for c in rule["caps"]
        ]
        rows.append(f"| {task_text(row['task'])} | " + " | ".join(cells) + " |")
    return [
        f"The task, fixed from the untrained model on {rule['prompts']} training prompts x "
        f"{rule['samples']} samples at T={rule['temperature']} before any method ran (finished "
        "fraction / accuracy, a cut-off response scoring 0): the smallest cap at which at least "
        f"{rule['finish_target']:.0%} finish, and the difficulty whose accuracy there is in "
        f"[{rule['accuracy_band'][0]}, {rule['accuracy_band'][1]}], nearest the middle. Chosen: "
        f"{task_text(choice['task'])}, max_new_tokens {choice['max_new_tokens']} "
        f"({choice['finished']:.0%} "
        f"finish, accuracy {choice['accuracy']:.2f}).",
        "",
        *rows,
    ]


def stopped_lines(compare: dict) -> list[str]:
    summary, planned = compare["summary"], compare["plan"]["setup"]["seeds"]
    if not summary.get("stopped_early"):
        return []
    runs = len(compare["runs"])
    return [
        f"**Cut short:** the plan's seeds were {planned}; the runs stopped after {runs} of "
        f"{len(planned) * len(compare['plan']['setup']['arms'])}, so the summary covers seeds "
        f"{summary['seeds']}, the ones every arm finished (paired differences need matched "
        "seeds). Read the intervals as those of a smaller study than planned.",
        "",
    ]


def gate_lines(gate: dict) -> list[str]:
    """The gate's table and verdict (studies since issue 32)."""
    if gate.get("skipped"):
        return [f"**No gate:** {gate['skipped']}.", ""]
    rule = gate["rule"]
    lines = [
        f"The gate, before any training: on {gate['items']} held-out prompts where the untrained "
        f"model had a finished wrong and a right attempt (of {gate['prompts']} prompts x "
        f"{rule['draws']} samples; its accuracy {gate['student_accuracy']:.2f}), the untrained "
        f"teacher's repair rate over {rule['samples']} samples per item and context at "
        f"T={rule['temperature']}, against the student alone and against the same kind of "
        f"context from another prompt; a context passes when it leads both by >= "
        f"{rule['margin']} with the 95% t-interval over items above 0. Load average at the end "
        f"{gate['machine']['load_average_1_5_15'][0]:.1f} on {gate['machine']['cpu_count']} "
        "cores (a correctness result, not a timing).",
        "",
    ]
    if gate["contexts"]:
        lines += [
            "| context | repair rate | lead over the student alone | lead over its shuffled "
            "control | passes |",
            "|---|---|---|---|---|",
        ]
        for kind, c in gate["contexts"].items():
            cells = [
                f"{c[k]['mean']:+.3f} [{c[k]['ci95'][0]:+.3f}, {c[k]['ci95'][1]:+.3f}]"
                for k in ("over_student", "over_shuffled")
            ]
            lines.append(
                f"| {kind} | {c['repair']:.3f} | {cells[0]} | {cells[1]} | "
                f"{'yes' if c['passes'] else 'no'} |"
            )
        lines.append("")
    lines += [f"Gate verdict: {gate['verdict']}.", ""]
    return lines


def power_lines(plan: dict) -> list[str]:
    """The primary endpoint's minimum detectable effect, as planned (studies since issue 32)."""
    power = plan.get("power")
    if not power or "mde" not in power:
        return []
    return [
        f"Power, fixed before the runs: from the previous study's per-seed vpd − vpd-no-estep "
        f"accuracy differences (sd {power['sd']:.4f} over {len(power['seed_differences'])} "
        f"seeds; its 80% upper bound {power['sd_upper_80']:.4f}), {power['seeds']} seeds detect "
        f"a true difference of {power['mde']:.3f} with probability {power['power']} at alpha "
        f"{power['alpha']} ({power['mde_at_sd']:.3f} at the point estimate of the spread).",
        "",
    ]


def timing_sentence(compare: dict) -> str:
    minutes, sizing = compare["seconds"] / 60, compare["plan"]["sizing"]
    planned = sizing["expected_minutes"]
    if "part_minutes" in sizing:
        gate = compare.get("gate", {}).get("seconds", 0) / 60  # 0: run with --no-gate
        baseline = compare["baseline"]["seconds"] / 60
        return (
            f"The gate, the baseline and the {len(compare['runs'])} runs took "
            f"{gate + minutes:.0f} min on {compare['machine']['cpu_count']} CPU cores (gate "
            f"{gate:.0f}, baseline {baseline:.0f}, runs {minutes - baseline:.0f}), against "
            f"{planned:.0f} min in the plan, which priced every part (gate, baseline, training, "
            "probes, evaluations)."
        )
    probe_minutes = sum(r["probe_seconds"] for r in compare["runs"]) / 60
    return (
        f"The baseline and the {len(compare['runs'])} runs took {minutes:.0f} min on "
        f"{compare['machine']['cpu_count']} CPU cores, against {planned:.0f} min in the plan's "
        "sizing, which priced the end-of-run evaluations but left out the teacher-margin probes "
        f"during training ({probe_minutes:.0f} min of the runs)."
    )


def unrun_study_section(compare: dict, device: str) -> list[str]:
    """A study without its summary: stopped by its gate, or planned and not (all) run yet."""
    plan = compare["plan"]
    s = plan["setup"]
    stopped = "stopped_at_gate" in plan
    planned = sum(len(Setup(**s).seeds_of(arm)) for arm in s["arms"])
    done = len(compare.get("runs") or [])
    state = (
        "The gate ran before any training and stopped the study: nothing was trained."
        if stopped
        else f"The gate passed (training uses the {s['context']} context); {done} of the "
        f"{planned} planned runs are done, and no result is read before all are (`--resume` "
        "continues it)."
    )
    return [
        f"#### Does training the teacher help? {'Stopped at the gate' if stopped else 'Under way'} "
        f"({device})",
        "",
        f"`benchmarks/compare_methods.py` (issue 32): {s['model']}, arithmetic, the arms "
        f"{', '.join(s['arms'])} planned for {s['steps']} steps, seeds {s['seeds']} for the "
        f"primary pair and {s['secondary_seeds']} for the others. {state}",
        "",
        *calibration_lines(compare["calibration"]),
        "",
        *gate_lines(compare["gate"]),
        *power_lines(plan),
        f"The plan was priced at {plan['sizing'].get('expected_minutes', float('nan')):.0f} min "
        "on this machine.",
    ]


def seeds_text(s: dict) -> str:
    """The seeds each arm ran (a study with `secondary_seeds` runs fewer beside its primary pair)."""
    seeds = ", ".join(map(str, s["seeds"]))
    if "secondary_seeds" not in s:
        return f"seeds {seeds}"
    primary = [a for a in s["arms"] if a in PRIMARY]
    return (
        f"seeds {seeds} for {' and '.join(primary)}, "
        f"{', '.join(map(str, s['secondary_seeds']))} for the others"
    )


def context_text(context: str) -> str:
    """What the vpd arms' teacher is shown besides the prompt (`Setup.context`)."""
    shown = {
        "diagnostic": "the verifier's feedback on the attempt",
        "binary": "only 'Your answer is incorrect.'",
        "sibling": "a right sibling attempt (else the feedback, when none was right)",
        "reference": "the task's reference solution",
    }[context]
    return f"vpd's teacher shown {shown}"


def compare_section(
    compare: dict, device: str, title: str = "Does training the teacher help?", png: str = ""
) -> list[str]:
    if "summary" not in compare:
        return unrun_study_section(compare, device)
    plan = compare["plan"]
    s = plan["setup"]
    base = compare["baseline"]
    context = s.get("context", "diagnostic")  # studies before the gate had no other
    per_token = "/ its tokens" in plan["measures"]["teacher_margin"]
    margin_unit = "each per token of its attempt, nats" if per_token else "summed over tokens, nats"
    png = png or f"compare-{device}.png"
    return [
        f"#### {title} {', '.join(s['arms'])} ({device})",
        "",
        f"`benchmarks/compare_methods.py`: {s['model']} with LoRA r={s['lora_r']}, arithmetic "
        f"({task_text(s['task'])}) with diagnostic feedback, {context_text(context)}, "
        f"{s['steps']} steps of {s['prompts_per_step']} "
        f"prompts x {s['num_generations']} rollouts, lr {s['lr']:g} for every arm, vpd's E-step "
        f"every {s['estep_every']} steps, {seeds_text(s)} (each seed gives every arm the same "
        f"prompt order and rollout seeds). {timing_sentence(compare)}",
        "",
        *stopped_lines(compare),
        *calibration_lines(compare["calibration"]),
        "",
        *(gate_lines(compare["gate"]) if "gate" in compare else []),
        *power_lines(plan),
        f"Primary endpoint, fixed before the runs: {plan['primary_endpoint']}. Student measures "
        f"on {s['val_size']} held-out prompts; teacher measures on the {len(base['probe'])} "
        "probe items (held-out prompts where the untrained student had a wrong and a right "
        "attempt; C is the verifier's feedback on the wrong one"
        + (
            f", not the {context} context the vpd arms train with"
            if context not in ("diagnostic", "binary")
            else ""
        )
        + "). Teacher skill: the repair rate of the teacher the method distils from minus the "
        "student's rate without feedback; teacher margin: log q(right attempt | x, C) - "
        f"log q(wrong attempt | x, C), {margin_unit}.",
        "",
        compare_table(compare),
        "",
        f"![learning and teacher-skill curves](benchmarks/results/{png})",
        "",
        "What the intervals support:",
        "",
        *reading(compare),
    ]


def step_setup(s: dict, dtype: str, how: str) -> str:
    """The sentence that says what a `train_step.py --compare` row measured."""
    return (
        f"`benchmarks/train_step.py --compare`: {s['model']}, LoRA {s['lora']}, "
        f"{s['prompts_per_step']} prompts x {s['num_generations']} rollouts, "
        f"{s['max_new_tokens']} new tokens, {dtype}; median of {s['timed_steps']} steps after "
        f"{s['warmup_steps']} warm-up{how}; load average at the end "
        f"{s['load_average_at_end'][0]:.1f}."
    )


def trl_section(trl: dict) -> list[str]:
    s = trl["setup"]
    lines = [
        "#### One training step against TRL's trainers (CPU)",
        "",
        step_setup(s, s["dtype"], "")
        + " vpd's update counts its M-step plus one third of an E-step (make demo's interval).",
        "",
        "| step | rollout (s) | update (s) | step (s) |",
        "|---|---|---|---|",
    ]
    for row in trl["results"]:
        lines.append(
            f"| {row['name']} | {row['rollout_s']:.1f} | {row['update_s']:.1f} "
            f"| {row['step_s']:.1f} |"
        )
    return lines


def engines_section(engines: dict) -> list[str]:
    """The rollout engines side by side in one run, vLLM's rows included (issue 31)."""
    s = engines["setup"]
    rows = engines["results"]
    cached = {r["method"]: r for r in rows if r.get("engine") == "cached"}
    lines = [
        "#### One training step per rollout engine, vLLM included (CPU)",
        "",
        step_setup(s, "float32 training", ", each row in its own process, one after the other")
        + " `vllm-bf16`: a bfloat16 engine beside the float32 trainer. A vLLM row's rollout "
        "includes pushing and checking the merged weights after every step.",
        "",
        "| step | rollout (s) | rollout x cached | update (s) | step (s) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        base = cached.get(row.get("method"))
        ratio = f"{row['rollout_s'] / base['rollout_s']:.2f}" if base else "-"
        lines.append(
            f"| {row['name']} | {row['rollout_s']:.1f} | {ratio} | {row['update_s']:.1f} "
            f"| {row['step_s']:.1f} |"
        )
    return lines


def precision_section(steps: dict) -> list[str]:
    """Each project row at float32 and at lower precisions, measured in one run."""
    s = steps["setup"]
    rows = {(r["method"], r["engine"], r["precision"]): r for r in steps["results"]}
    lines = [
        "#### float32 against bfloat16, one run (CPU)",
        "",
        f"`benchmarks/train_step.py --compare ... --precisions`: the setting above "
        f"({s['model']}, {s['max_new_tokens']} new tokens), median of {s['timed_steps']} steps "
        f"after {s['warmup_steps']} warm-up; load average at the end "
        f"{s['load_average_at_end'][0]:.1f}. bf16-mixed keeps float32 weights and computes "
        "under bfloat16 autocast; bf16-true stores the weights and optimizer state in bfloat16 "
        "with no float32 copy, so most small updates round away (a speed bound, not a setting "
        "to train with; the run warns).",
        "",
        "| step | precision | rollout / update / step (s) | step speed-up over float32 |",
        "|---|---|---|---|",
    ]
    for (method, engine, precision), row in rows.items():
        base = rows.get((method, engine, "32-true"))
        if base is None:
            continue
        lines.append(
            f"| {method} ({engine}) | {precision} | {row['rollout_s']:.1f} / "
            f"{row['update_s']:.1f} / {row['step_s']:.1f} | {base['step_s'] / row['step_s']:.2f}x |"
        )
    return lines


def floor_section(floor: dict) -> list[str]:
    s = floor["setup"]
    return [
        "#### What bounds a step (CPU)",
        "",
        f"`benchmarks/floor.py`: {s['model']}, {s['prompts']} prompts x {s['samples']} samples, "
        f"{s['max_new_tokens']} new tokens, {s['dtype']}, {s['torch_threads']} threads; the "
        "floor of a forward is the larger of reading its weights once at the copy rate and its "
        "matmul FLOPs at the GEMM rate of its shape (both measured in the same run).",
        "",
        floor_table(floor),
    ]


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
    load = kernels.get("load_average")
    background = kernels.get("background", {}).get("workers", 0)
    lines = [
        f"#### The losses alone ({kernels['device']})",
        "",
        f"`benchmarks/bench_kernels.py`: {c['workload']}, N={c['n']} tokens, V={c['v']}, "
        f"{c['dtype']}, median of {c['repeats']}; peak memory above the inputs"
        + (f"; load average {load['start']} at the start, {load['end']} at the end" if load else "")
        + ".",
    ]
    if background:
        lines += [
            "",
            f"Under load: the same step again beside {background} busy workers "
            f"({kernels['background']['kind']}), load average at its end, and how many times "
            "slower than without them.",
        ]
    loaded = (
        ["| under load (ms) | x slower | load |", "|---|---|---|"] if background else ["|", "|"]
    )
    lines += [
        "",
        "| inputs | method | time (ms) | x vpd_kernels | peak extra (MB) | x hardware floor "
        + loaded[0],
        "|---|---|---|---|---|---" + loaded[1],
    ]
    for row in kernels["results"]:
        cells = [row["mode"], row["method"]]
        if row["status"] != "ok":
            lines.append(f"| {row['mode']} | {row['method']} | {row['status']} | | | |")
            continue
        cells += [
            f"{row['time_ms']:.0f}",
            f"{row['ratio_to_vpd']:.2f}" if "ratio_to_vpd" in row else "-",
            f"{row['peak_extra_mb']:.0f}",
            f"{row['ratio_to_floor']:.2f}" if "ratio_to_floor" in row else "-",
        ]
        if background:
            under = row.get("loaded", {})
            cells += (
                [f"{under['time_ms']:.0f}", f"{under['slowdown']:.1f}", f"{under['load_average']}"]
                if "slowdown" in under
                else ["-", "-", "-"]
            )
        lines.append("| " + " | ".join(cells) + " |")
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
    previous = load("previous-study-cpu.json")
    if previous is not None:
        title = "The previous study (issue 23, before the gate):"
        sections.append(compare_section(previous, "cpu", title, "previous-study-cpu.png"))
    trl = load("train-step-vs-trl-cpu.json")
    if trl is not None:
        sections.append(trl_section(trl))
    engines = load("train-step-vllm-cpu.json")
    if engines is not None:
        sections.append(engines_section(engines))
    precision = load("train-step-precision-cpu.json")
    if precision is not None:
        sections.append(precision_section(precision))
    floor = load("floor-cpu.json")
    if floor is not None:
        sections.append(floor_section(floor))
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
    kernels = load("kernels-cpu.json")
    if kernels is not None and "precision" in kernels:
        path = ROOT / "kernels" / "README.md"
        begin, end = "<!-- precision:begin -->\n", "<!-- precision:end -->"
        text = path.read_text()
        head, tail = text.split(begin)[0], text.split(end)[1]
        path.write_text(f"{head}{begin}{precision_markdown(kernels)}{end}{tail}")
        print(f"updated {path}")


if __name__ == "__main__":
    main()
