"""Generated multi-step integer arithmetic with feedback from the problem's own structure.

A problem is a chain ``start op1 x1 op2 x2 ...`` written with explicit parentheses, e.g.
``((17 + 35) * 4) - 120``, so its intermediate results ``r1 = 52, r2 = 208, r3 = 88`` are known. The
student is asked to write one line per operation (``Step k: a op b = result``) and the final number
inside ``<answer>...</answer>``.

Feedback levels (cumulative after ``binary``; a correct answer always gets "Correct ..."):

- ``binary``: "Your answer is incorrect." and nothing else, for a wrong or unreadable answer alike:
  the one bit the reward carries, as text (the control that shows what the richer levels add).
- ``outcome``: "Your answer 91 is incorrect."
- ``diagnostic``: adds the first wrong intermediate result and how it is wrong. The ``Step k:`` lines
  are read (the first integer after the last ``=`` on the line is the claimed result). The first step whose
  claimed result differs from ``r_k`` is reported with what it should compute and whether the claim
  is too high, too low or of the wrong sign. If every written step is right, the final answer itself is
  diagnosed. Without step lines, the answer is compared with the intermediates: equal to ``r_k`` for an
  earlier k means the remaining operations were not applied; otherwise it is too high, too low or of
  the wrong sign.
- ``solution``: adds the right answer with the worked steps.

A response without an integer inside ``<answer>`` (with ``answer_format="last_number"``: nor a final
stated result) gets reward 0 and a format message.
"""

from __future__ import annotations

import operator
import random
import re
import warnings
from typing import Literal

from vpd_lightning.errors import require
from vpd_lightning.tasks.base import (
    Record,
    Task,
    Verdict,
    check_choice,
    check_int,
    option,
    register_task,
)
from vpd_lightning.tasks.parsing import extract_tagged_answer, parse_int, stated_answer

OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
FEEDBACK_LEVELS = ("binary", "outcome", "diagnostic", "solution")
ANSWER_FORMATS = ("tag", "last_number")
BINARY_FEEDBACK = "Your answer is incorrect."
SYSTEM_PROMPT = (
    "Solve the arithmetic problem one operation at a time, innermost parentheses first. Write each "
    "step on its own line as `Step k: a op b = result`. Then give the final number inside "
    "<answer>...</answer>."
)
_STEP_LINE = re.compile(r"^\W*step\s*(\d+)\b(.*)$", re.IGNORECASE | re.MULTILINE)
_INTEGER = re.compile(r"[-+]?\d[\d,]*")


def _how_wrong(value: int, expected: int) -> str:
    if value * expected < 0:
        return "has the wrong sign"
    return "is too high" if value > expected else "is too low"


def _claimed_steps(text: str) -> dict[int, int]:
    """Step number -> the result the response claims for it (first claim per step wins)."""
    claims: dict[int, int] = {}
    for number, rest in _STEP_LINE.findall(text):
        if "=" not in rest:
            continue
        integers = _INTEGER.findall(rest.rsplit("=", 1)[1])
        value = parse_int(integers[0]) if integers else None
        if value is not None:
            claims.setdefault(int(number), value)
    return claims


@register_task
class ArithmeticTask(Task):
    """Seeded, generated integer problems: ``num_ops`` operations on operands in [1, max_operand]."""

    name = "arithmetic"

    def __init__(
        self,
        num_ops: int = 3,
        max_operand: int = 20,
        operations: str = "+-*",
        feedback: Literal["binary", "outcome", "diagnostic", "solution"] = "diagnostic",
        num_train: int = 2000,
        num_test: int = 200,
        seed: int = 0,
        answer_format: str = "tag",
    ) -> None:
        """``answer_format="last_number"`` also accepts a response without ``<answer>`` tags and
        reads its last stated result as a grader would (`parsing.stated_answer`: the last ``= n``,
        "answer is n" or ``\\boxed{n}``; none: a format error), so small models that ignore the
        format still get a learning signal and feedback never quotes a number the response did not
        give as its answer. It is a plain string, checked here, so a wrong one is refused with
        its key named."""
        check_choice("answer_format", answer_format, ANSWER_FORMATS)
        check_int("num_ops", num_ops, 1)
        check_int("max_operand", max_operand, 2)
        ok = isinstance(operations, str) and operations and not set(operations) - set(OPERATIONS)
        require(
            ok,
            option("operations"),
            operations,
            f"must be a non-empty string of {''.join(OPERATIONS)}",
        )
        check_choice("feedback", feedback, FEEDBACK_LEVELS)
        check_int("num_train", num_train, 1)
        check_int("num_test", num_test, 1)
        distinct = max_operand * (len(set(operations)) * max_operand) ** min(num_ops, 64)
        if distinct < num_train + num_test:  # the splits are distinct problems: they get fewer
            warnings.warn(
                f"{option('num_train')} = {num_train} and num_test = {num_test}: num_ops "
                f"{num_ops}, max_operand {max_operand} and operations {operations!r} give only "
                f"{distinct} distinct problems, so the splits get fewer; raise max_operand or "
                "num_ops",
                stacklevel=2,
            )
        self.num_ops, self.max_operand, self.operations = num_ops, max_operand, operations
        self.feedback, self.num_train, self.num_test, self.seed = (
            feedback,
            num_train,
            num_test,
            seed,
        )
        self.answer_format = answer_format
        self._cache: dict[str, list[Record]] = {}

    def _problem(self, rng: random.Random, split: str, index: int) -> Record:
        start = value = rng.randint(1, self.max_operand)
        expression, steps, intermediates = str(value), [], []
        for _ in range(self.num_ops):
            op, operand = rng.choice(self.operations), rng.randint(1, self.max_operand)
            value = OPERATIONS[op](value, operand)
            expression = f"({expression} {op} {operand})"
            steps.append([op, operand])
            intermediates.append(value)
        expression = expression[1:-1]
        return {
            "id": f"arithmetic-{split}-{index}",
            "prompt": f"Compute {expression}.",
            "system": SYSTEM_PROMPT,
            "expression": expression,
            "start": start,
            "steps": steps,
            "intermediates": intermediates,
            "answer": value,
        }

    def _generate(self, split: str, count: int, exclude: set[str]) -> list[Record]:
        rng = random.Random(f"arithmetic:{self.seed}:{split}")
        records: list[Record] = []
        for _ in range(100 * count):
            if len(records) == count:
                break
            record = self._problem(rng, split, len(records))
            if record["expression"] not in exclude:
                exclude.add(record["expression"])
                records.append(record)
        return records

    def records(self, split: str) -> list[Record]:
        self.check_split(split)
        if not self._cache:
            seen: set[str] = set()
            self._cache["test"] = self._generate("test", self.num_test, seen)
            self._cache["train"] = self._generate("train", self.num_train, seen)
        return list(self._cache[split])

    @staticmethod
    def worked_steps(record: Record) -> list[str]:
        previous = record["start"]
        lines = []
        for k, ((op, operand), result) in enumerate(
            zip(record["steps"], record["intermediates"], strict=True), 1
        ):
            lines.append(f"Step {k}: {previous} {op} {operand} = {result}")
            previous = result
        return lines

    @property
    def feedback_reveals_answer(self) -> bool:
        return self.feedback == "solution"

    def reference_solution(self, record: Record) -> str:
        return "\n".join([*self.worked_steps(record), f"<answer>{record['answer']}</answer>"])

    def diagnose(self, record: Record, completion: str, answer: int) -> tuple[str, int | None]:
        """The diagnostic sentence and the first wrong step (None when only the answer is off)."""
        expected, inter = record["answer"], record["intermediates"]
        claims = _claimed_steps(completion)
        work = self.worked_steps(record)
        for k, result in enumerate(inter, 1):
            if k in claims and claims[k] != result:
                computation = work[k - 1].split(": ", 1)[1].rsplit(" =", 1)[0]
                return (
                    f"Step {k} should compute {computation}; your result {claims[k]} "
                    f"{_how_wrong(claims[k], result)}.",
                    k,
                )
        if claims:
            return (
                f"Your steps are right, but the final answer {answer} {_how_wrong(answer, expected)}.",
                None,
            )
        for k, result in enumerate(inter[:-1], 1):
            if answer == result:
                return (
                    f"Your answer equals the result after step {k} of {len(inter)}; the remaining "
                    "operations were not applied.",
                    k + 1,
                )
        return f"The final answer {_how_wrong(answer, expected)}.", None

    def verify(self, record: Record, completion: str) -> Verdict:
        expected = record["answer"]
        raw = extract_tagged_answer(completion)
        if raw is None and self.answer_format == "last_number":
            raw = stated_answer(completion)
        answer = parse_int(raw) if raw is not None else None
        info: dict[str, object] = {"answer": answer, "expected": expected, "format_ok": True}
        solution = (
            f"The correct answer is {expected}: " + "; ".join(self.worked_steps(record)) + "."
        )
        if answer is None:
            info["format_ok"] = False
            if self.feedback == "binary":
                return Verdict(0.0, BINARY_FEEDBACK, info)
            text = (
                "Format error: no integer inside <answer>...</answer>; end with e.g. "
                "<answer>42</answer>."
            )
            if self.feedback == "solution":
                text += " " + solution
            return Verdict(0.0, text, info)
        if answer == expected:
            return Verdict(1.0, f"Correct: {answer} is the right answer.", info)
        if self.feedback == "binary":
            return Verdict(0.0, BINARY_FEEDBACK, info)
        parts = [f"Your answer {answer} is incorrect."]
        if self.feedback in ("diagnostic", "solution"):
            sentence, info["first_wrong_step"] = self.diagnose(record, completion, answer)
            parts.append(sentence)
        if self.feedback == "solution":
            parts.append(solution)
        return Verdict(0.0, " ".join(parts), info)
