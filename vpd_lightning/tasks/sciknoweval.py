"""SciKnowEval-style multiple choice from the user's JSONL files.

Each line has ``prompt`` (question and lettered options such as ``A: ...``), ``answer`` (the right
letter) and optionally ``system`` (the answer-format instruction). Reward 1 iff the letter inside the
last ``<answer>...</answer>`` is right. Feedback levels: ``outcome`` ("B is incorrect.") and
``eliminate`` ("B is not the answer."; the wrong option is ruled out, the right one not revealed).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from vpd_lightning.errors import UserInputError, require
from vpd_lightning.tasks.base import (
    SPLITS,
    Record,
    Task,
    Verdict,
    check_choice,
    option,
    register_task,
)
from vpd_lightning.tasks.parsing import extract_tagged_answer
from vpd_lightning.tasks.records import check_fraction, load_split

FEEDBACK_LEVELS = ("outcome", "eliminate")
_OPTION = re.compile(r"^\s*([A-Z])\s*[:.)]", re.MULTILINE)
_LETTER = re.compile(r"^\(?([A-Za-z])\)?(?:[:.)]|\s|$)")


def option_letters(prompt: str) -> list[str]:
    """The option letters listed in a question (``A: ...`` lines); A-D when none are found."""
    letters = sorted(set(_OPTION.findall(prompt)))
    return letters or ["A", "B", "C", "D"]


def parse_letter(answer: str) -> str | None:
    """``B``, ``(B)``, ``B: text`` or ``b`` -> ``B``; anything else -> None."""
    match = _LETTER.match(answer.strip())
    return match.group(1).upper() if match else None


@register_task
class SciKnowEvalTask(Task):
    """Multiple-choice questions from ``path``.

    ``path`` is a directory with ``train.jsonl`` and ``test.jsonl``, or one JSONL file split by
    ``seed``. With ``domains``, ``path`` is a root holding one such directory per domain, and the
    records of all listed domains are concatenated.
    """

    name = "sciknoweval"

    def __init__(
        self,
        path: str,
        domains: list[str] | None = None,
        feedback: Literal["outcome", "eliminate"] = "outcome",
        test_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        check_choice("feedback", feedback, FEEDBACK_LEVELS)
        check_fraction(test_fraction)
        root = Path(path).expanduser()
        if not root.exists():
            raise UserInputError(f"data.task.path = {path!r}: SciKnowEval data path does not exist")
        require(domains is None or domains, option("domains"), domains, "must list a domain")
        self.paths = [root / d for d in domains] if domains else [root]
        for p in self.paths:
            if not p.exists():
                raise UserInputError(f"{option('domains')} = {domains!r}: {p} does not exist")
        self.feedback, self.test_fraction, self.seed = feedback, test_fraction, seed
        for (
            split
        ) in SPLITS:  # read every file now, so a bad line stops the run before the model loads
            self.records(split)

    def records(self, split: str) -> list[Record]:
        return [
            {**record, "answer": parse_letter(str(record["answer"]))}
            for path in self.paths
            for record in load_split(path, split, self.test_fraction, self.seed, check_question)
        ]

    def reference_solution(self, record: Record) -> str:
        return record["answer"]

    def verify(self, record: Record, completion: str) -> Verdict:
        raw = extract_tagged_answer(completion)
        letter = parse_letter(raw) if raw is not None else None
        valid = option_letters(record["prompt"])
        info = {"answer": letter, "expected": record["answer"]}
        if letter is None or letter not in valid:
            return Verdict(
                0.0,
                f"Format error: put exactly one option letter ({', '.join(valid)}) inside "
                "<answer>...</answer>.",
                info,
            )
        if letter == record["answer"]:
            return Verdict(1.0, f"Correct: {letter} is the answer.", info)
        if self.feedback == "eliminate":
            return Verdict(0.0, f"{letter} is not the answer.", info)
        return Verdict(0.0, f"Your answer {letter} is incorrect.", info)


def check_question(record: Record) -> str | None:
    """What is wrong with one multiple-choice record, or None."""
    if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
        return "needs a non-empty string `prompt`"
    if parse_letter(str(record.get("answer", ""))) is None:
        return f"`answer` must be an option letter, got {record.get('answer')!r}"
    return None
