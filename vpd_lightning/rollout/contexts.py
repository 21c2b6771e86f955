"""Teacher contexts ``C``: what the teacher sees about each rollout (vpd_method.md section 5).

For one prompt's group of rollouts, :class:`TeacherContextBuilder` picks each rollout's context from
the configured source and renders the teacher prompt: the question, then the context block, then the
instruction to answer the question, through the same chat template as the student's prompt. Only the
context is cut to ``max_context_tokens``; the question is never truncated. A rollout whose context is
empty gets ``has_context=False`` and is masked out of distillation.

The teacher then teacher-forces the student's completion ids (`policy.packing`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from vpd_lightning.options import SamplingParams
from vpd_lightning.rollout.engine import RolloutEngine
from vpd_lightning.rollout.prompts import question_text, render_messages, with_question
from vpd_lightning.tasks.base import TRUNCATION_MARK, Record, Task, Verdict

FeedbackSource = Literal[
    "verifier",
    "sibling",
    "sibling_and_feedback",
    "sibling_and_feedback_always",
    "self_critique",
    "reference",
]
SOURCES: tuple[str, ...] = get_args(FeedbackSource)
HEADERS = {
    "verifier": "Feedback on a previous attempt at this question:",
    "sibling": "A correct solution to this question:",
    "self_critique": "A critique of a previous attempt at this question:",
    "attempt_feedback": "Feedback on an earlier attempt at this question:",
    "reference": "A reference solution to this question:",
}
INSTRUCTION = "Using the information above, answer the original question."
CRITIQUE_REQUEST = (
    "Write a short critique of this response: what is right or wrong about it, and how to reach a "
    "correct answer. Do not write a full solution."
)


@dataclass(frozen=True)
class TeacherContext:
    """One rollout's teacher context and teacher prompt.

    ``source`` is where the context came from ("verifier" when ``sibling`` fell back to it);
    ``prompt_ids`` is the rendered teacher prompt, ready to be followed by the completion ids (for a
    rollout without context, the plain student prompt).
    """

    context: str
    has_context: bool
    prompt_ids: list[int]
    source: str


class TeacherContextBuilder:
    """Builds :class:`TeacherContext` for each rollout of a group.

    Sources: ``verifier`` (the rollout's own verdict feedback), ``sibling`` (the response of another
    successful rollout of the same prompt, never the rollout itself; falls back to the verifier
    feedback when none succeeded), ``sibling_and_feedback`` (SDPO's reprompt as its reference code
    runs it: that sibling's response when there is one, else the rollout's own verifier feedback,
    each under SDPO's header), ``sibling_and_feedback_always`` (both blocks whenever each exists:
    SDPO's ``environment_feedback_only_without_solution: False``), ``self_critique`` (the model's
    critique of its own response given the outcome, produced by ``critique_fn``), ``reference``
    (``task.reference_solution``).

    ``critique_fn`` receives critique prompts, each the plain text of one user message (the caller
    renders it with the chat template and generates), and returns one critique per prompt, in order.
    """

    def __init__(
        self,
        tokenizer: Any,
        source: FeedbackSource = "verifier",
        max_context_tokens: int = 256,
        task: Task | None = None,
        critique_fn: Callable[[list[str]], list[str]] | None = None,
        success_threshold: float = 1.0,
    ) -> None:
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if max_context_tokens < 1:
            raise ValueError(f"max_context_tokens must be >= 1, got {max_context_tokens}")
        if source == "self_critique" and critique_fn is None:
            raise ValueError("source='self_critique' needs a critique_fn")
        if source == "reference" and task is None:
            raise ValueError("source='reference' needs the task (for task.reference_solution)")
        self.tokenizer, self.source, self.max_context_tokens = tokenizer, source, max_context_tokens
        self.task, self.critique_fn = task, critique_fn
        self.success_threshold = success_threshold

    def build_batch(
        self,
        records: Sequence[Record],
        completions: Sequence[Sequence[str]],
        verdicts: Sequence[Sequence[Verdict]],
    ) -> list[list[TeacherContext]]:
        """Contexts for several groups at once (one ``critique_fn`` call for the whole batch)."""
        if not len(records) == len(completions) == len(verdicts):
            raise ValueError("records, completions and verdicts must have one entry per prompt")
        for group, judged in zip(completions, verdicts, strict=True):
            if len(group) != len(judged):
                raise ValueError(f"{len(group)} completions but {len(judged)} verdicts in a group")
        raw = self._raw_contexts(records, completions, verdicts)
        return [
            [self.render(record, text, source) for text, source in group]
            for record, group in zip(records, raw, strict=True)
        ]

    def critique_prompts(
        self, record: Record, completions: Sequence[str], verdicts: Sequence[Verdict]
    ) -> list[str]:
        """For each rollout, the text of one user message: the question, the response, its outcome
        (correct or incorrect) and a request to critique it."""
        question = question_text(record)
        prompts = []
        for completion, verdict in zip(completions, verdicts, strict=True):
            outcome = "correct" if verdict.reward >= self.success_threshold else "incorrect"
            text = (
                f"{question}\n\nA response to this question:\n{completion}\n\n"
                f"Outcome: the response is {outcome}.\n\n{CRITIQUE_REQUEST}"
            )
            prompts.append(text)
        return prompts

    def _raw_contexts(
        self,
        records: Sequence[Record],
        completions: Sequence[Sequence[str]],
        verdicts: Sequence[Sequence[Verdict]],
    ) -> list[list[tuple[str, str]]]:
        """(context text, source) per rollout, before truncation."""
        if self.source == "verifier":
            return [[(v.feedback, "verifier") for v in group] for group in verdicts]
        if self.source.startswith("sibling"):
            return [
                _siblings(group, judged, self.success_threshold, self.source)
                for group, judged in zip(completions, verdicts, strict=True)
            ]
        if self.source == "reference":
            assert self.task is not None
            return [
                [(self.task.reference_solution(record) or "", "reference")] * len(group)
                for record, group in zip(records, completions, strict=True)
            ]
        assert self.critique_fn is not None
        prompts = [
            self.critique_prompts(r, c, v)
            for r, c, v in zip(records, completions, verdicts, strict=True)
        ]
        flat = [p for group in prompts for p in group]
        critiques = list(self.critique_fn(flat))
        if len(critiques) != len(flat):
            raise ValueError(
                f"critique_fn returned {len(critiques)} critiques for {len(flat)} prompts"
            )
        out, start = [], 0
        for group in prompts:
            out.append([(c, "self_critique") for c in critiques[start : start + len(group)]])
            start += len(group)
        return out

    def _truncate(self, text: str, budget: int | None = None) -> str:
        budget = self.max_context_tokens if budget is None else budget
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= budget:
            return text
        mark = len(self.tokenizer(TRUNCATION_MARK, add_special_tokens=False)["input_ids"])
        keep = max(budget - mark, 0)
        return self.tokenizer.decode(ids[:keep]) + TRUNCATION_MARK

    def render(self, record: Record, text: str | tuple[str, str], source: str) -> TeacherContext:
        """One teacher context from its text (a (solution, feedback) pair for SDPO's reprompt)
        under `source`'s header, cut to the token budget; empty text: masked."""
        if isinstance(text, tuple):  # (sibling solution, feedback): each part gets its own header
            return self._render_parts(record, *text, source)
        context = self._truncate(text.strip()) if text.strip() else ""
        if not context:  # masked; the ids are the plain student prompt, for callers that want them
            return TeacherContext(
                "",
                False,
                render_messages(self.tokenizer, with_question(record, question_text(record))),
                source,
            )
        teacher_text = f"{question_text(record)}\n\n{HEADERS[source]}\n{context}\n\n{INSTRUCTION}"
        ids = render_messages(self.tokenizer, with_question(record, teacher_text))
        return TeacherContext(context, True, ids, source)

    def _render_parts(
        self, record: Record, solution: str, feedback: str, source: str
    ) -> TeacherContext:
        """SDPO's reprompt: the sibling's solution block, then the feedback block (either may be
        absent); the token budget is shared, the solution first."""
        blocks, budget = [], self.max_context_tokens
        for header, text in (
            (HEADERS["sibling"], solution),
            (HEADERS["attempt_feedback"], feedback),
        ):
            text = text.strip()
            if not text or budget < 1:
                continue
            cut = self._truncate(text, budget)
            budget -= len(self.tokenizer(cut, add_special_tokens=False)["input_ids"])
            blocks.append(f"{header}\n{cut}")
        if not blocks:
            return self.render(record, "", source)
        teacher_text = "\n\n".join([question_text(record), *blocks, INSTRUCTION])
        ids = render_messages(self.tokenizer, with_question(record, teacher_text))
        return TeacherContext("\n\n".join(blocks), True, ids, source)


def _siblings(
    completions: Sequence[str], verdicts: Sequence[Verdict], success_threshold: float, source: str
) -> list[tuple[str | tuple[str, str], str]]:
    """Each rollout gets the next successful rollout after it (cyclically), never itself.

    ``sibling``: that solution, else the rollout's own verifier feedback. ``sibling_and_feedback``
    follows SDPO's reference (lasgroup/SDPO ``verl/trainer/config/actor/actor.yaml:125``,
    ``environment_feedback_only_without_solution: True``, read in ``_build_teacher_message``,
    ``verl/trainer/ppo/ray_trainer.py:710-718``): the feedback block only when there is no
    solution. ``sibling_and_feedback_always``: (solution or "", own feedback) for every rollout.
    """
    successes = [i for i, v in enumerate(verdicts) if v.reward >= success_threshold]
    out: list[tuple[str | tuple[str, str], str]] = []
    for i, verdict in enumerate(verdicts):
        others = [j for j in successes if j != i]
        solution = completions[next((j for j in others if j > i), others[0])] if others else ""
        if source == "sibling_and_feedback_always":
            out.append(((solution, verdict.feedback), source))
        elif source == "sibling_and_feedback":
            out.append(((solution, "" if solution else verdict.feedback), source))
        elif solution:
            out.append((solution, "sibling"))
        else:
            out.append((verdict.feedback, "verifier"))
    return out


def engine_critic(
    engine: RolloutEngine, tokenizer: Any, max_new_tokens: int
) -> Callable[[list[str]], list[str]]:
    """A `critique_fn` that has the live policy write each critique (greedy) with `engine`."""

    def critique(critique_prompts: list[str]) -> list[str]:
        prompts = [
            render_messages(tokenizer, [{"role": "user", "content": text}])
            for text in critique_prompts
        ]
        params = SamplingParams(num_samples=1, temperature=0.0, max_new_tokens=max_new_tokens)
        return tokenizer.batch_decode(engine.generate(prompts, params), skip_special_tokens=True)

    return critique
