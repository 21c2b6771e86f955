"""The gate before any training: can the untrained model's teacher use a context at all?

VPD distils from the model shown a context ``C``; if that teacher answers no better than the
student alone, or no better than when shown another prompt's context, there is nothing to distil
and no training run can test the method. On held-out prompts where the untrained model has a
finished wrong attempt and a right one, the teacher's repair rate (right answers among its samples
given the question and ``C`` about the wrong attempt) is measured under every context the project
offers, against the student alone and against the same kind of context taken from another prompt
(the shuffled control). A context passes when it beats both by the margin fixed in `GateRule`;
training uses the passing context with the largest lead over its control, and with none the study
stops. Every condition of an item is sampled with the same seed, so the comparisons are paired.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

from power import t_interval

from vpd_lightning.options import SamplingParams
from vpd_lightning.rollout import TeacherContextBuilder
from vpd_lightning.rollout.sampling import Attempts, answer_records, sample_and_verify
from vpd_lightning.tasks.arithmetic import BINARY_FEEDBACK

CONTEXTS = ("diagnostic", "binary", "sibling", "reference")
"""Verifier feedback (diagnostic), the one-bit feedback, a correct sibling attempt, the task's
reference solution (the worked steps and the answer)."""
SHUFFLED = ("diagnostic", "sibling", "reference")
"""Contexts whose text depends on the prompt; binary's text is the same for every prompt, so its
shuffled control is itself and it can never pass (it tells the teacher nothing about this prompt)."""
SOURCE = {"diagnostic": "verifier", "binary": "verifier", "sibling": "sibling"}


@dataclass
class GateRule:
    """Fixed before the gate runs; recorded with its result."""

    items: int = 40
    """Held-out prompts with a finished wrong and a right attempt (the first of each)."""
    draws: int = 4
    """Student samples per held-out prompt from which the items' attempts are drawn."""
    samples: int = 2
    """Samples per item under each condition."""
    margin: float = 0.10
    """A context must beat the student alone and its shuffled control by at least this much
    (mean paired difference in repair rate), with the 95% t-interval over items above 0."""
    temperature: float = 0.6


def paired_items(attempts: Attempts, size: int) -> list[dict]:
    """Prompts with a finished wrong attempt and a right one: the first of each, in prompt order
    (the gate's items here, the study's teacher probe in compare_methods.py)."""
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
                    "right_text": attempts.texts[r],
                    "wrong_ids": attempts.completion_ids[w],
                    "right_ids": attempts.completion_ids[r],
                    "feedback": attempts.verdicts[w].feedback,
                }
            )
    return items[:size]


def context_text(kind: str, item: dict, task) -> str:
    """The context of `kind` that item's wrong attempt gets."""
    if kind == "diagnostic":
        return item["feedback"]
    if kind == "binary":
        return BINARY_FEEDBACK
    if kind == "sibling":
        return item["right_text"]
    return task.reference_solution(item["record"])


def teacher_prompts(builder: TeacherContextBuilder, task, items: list[dict], kind: str, shift: int):
    """Each item's teacher prompt: its own question with the `kind` context of the item `shift`
    places on (0: its own; 1: the shuffled control, another prompt's context)."""
    n = len(items)
    return [
        builder.render(
            item["record"], context_text(kind, items[(i + shift) % n], task), SOURCE.get(kind, kind)
        ).prompt_ids
        for i, item in enumerate(items)
    ]


def repair_rates(module, task, items: list[dict], rule: GateRule, budget: dict, seed: int):
    """Per condition, per item: the fraction of samples that are right. `budget`: the study's
    `max_new_tokens` and `max_context_tokens`, so the gate's teacher sees what training's would."""
    builder = TeacherContextBuilder(
        module.tokenizer, "verifier", max_context_tokens=budget["max_context_tokens"]
    )
    params = SamplingParams(rule.samples, rule.temperature, 1.0, budget["max_new_tokens"], seed)
    records = [item["record"] for item in items]

    def rates(attempts: Attempts) -> list[float]:
        return attempts.rewards().mean(1).tolist()

    with module.policy.student():  # untrained: the teacher is the student's weights plus C
        out = {
            "student": rates(
                answer_records(module.engine, module.tokenizer, task, records, params, 1)
            )
        }
        conditions = [(k, 0) for k in CONTEXTS] + [(k, 1) for k in SHUFFLED]
        for kind, shift in conditions:
            prompts = teacher_prompts(builder, task, items, kind, shift)
            answers = sample_and_verify(
                module.engine, module.tokenizer, task, records, prompts, params, 1
            )
            out[f"shuffled_{kind}" if shift else kind] = rates(answers)
    return out


def decide(rates: dict[str, list[float]], margin: float) -> dict:
    """Each context's lead over the student alone and over its shuffled control (mean and 95%
    t-interval over items), whether it passes, and the context training may use (None: stop)."""
    items = len(rates["student"])
    if items < 2:
        return {
            "contexts": {},
            "passed": [],
            "chosen": None,
            "verdict": f"stop: only {items} held-out prompt(s) where the untrained model has both "
            "a right and a wrong finished attempt, too few to measure whether a teacher can use "
            "its context; this model cannot test the method on this task",
        }
    out, passed = {}, []
    for kind in CONTEXTS:
        control = rates[f"shuffled_{kind}"] if kind in SHUFFLED else rates[kind]
        leads = {}
        for name, base in (("over_student", rates["student"]), ("over_shuffled", control)):
            diff = [a - b for a, b in zip(rates[kind], base, strict=True)]
            leads[name] = {"mean": statistics.fmean(diff), "ci95": t_interval(diff)}
        ok = all(lead["mean"] >= margin and lead["ci95"][0] > 0 for lead in leads.values())
        out[kind] = {"repair": statistics.fmean(rates[kind]), **leads, "passes": ok}
        if ok:
            passed.append(kind)
    chosen = max(passed, key=lambda k: out[k]["over_shuffled"]["mean"], default=None)
    if chosen is None:
        verdict = (
            f"stop: no context's teacher beats both the student alone and its shuffled control "
            f"by {margin} (with the interval above 0); this model cannot test the method on this "
            "task: train nothing, use a larger model or a task whose feedback it can read"
        )
    else:
        verdict = f"train with the {chosen} context"
    return {"contexts": out, "passed": passed, "chosen": chosen, "verdict": verdict}


def run_gate(module, task, records: list[dict], rule: GateRule, budget: dict) -> dict:
    """The whole gate on `records` (held-out prompts) with the untrained `module`."""
    start = time.perf_counter()
    params = SamplingParams(rule.draws, rule.temperature, 1.0, budget["max_new_tokens"], 0)
    with module.policy.student():
        attempts = answer_records(module.engine, module.tokenizer, task, records, params, 1)
    items = paired_items(attempts, rule.items)
    rates = repair_rates(module, task, items, rule, budget, seed=1) if items else {}
    decision = decide(rates or {"student": []}, rule.margin)
    return {
        "rule": asdict(rule),
        "prompts": len(records),
        "student_accuracy": statistics.fmean(attempts.rewards().mean(1).tolist()),
        "items": len(items),
        "rates": rates,
        **decision,
        "seconds": time.perf_counter() - start,
    }
