"""The user's own data: JSONL records checked by answer match or by Python tests.

Each record has ``prompt`` (a string or a list of chat messages), optionally ``system``, and either

- ``answer``: compared with the content of the response's last ``<answer>...</answer>``, exactly
  (after trimming whitespace) or numerically (``match``: "exact", "numeric", or "auto": numeric when
  both sides are numbers, else exact); or
- ``tests``: Python source (a string or a list of lines) of top-level asserts. With ``entry_point``
  (the function under test) they run in the trusted judge as for HumanEval: the tests see that
  function (each call goes to the sandboxed response and returns plain data) and what they import
  themselves, nothing else of the response. Without it they run after the response's code in its
  sandboxed process: the weaker ``script`` mode (``Verdict.info["mode"]``; see ``harness.py``).

Records with both or neither are rejected when loaded.
"""

from __future__ import annotations

import ast
import math
from keyword import iskeyword
from pathlib import Path
from typing import Literal

from vpd_lightning.errors import UserInputError
from vpd_lightning.tasks.base import (
    SPLITS,
    Record,
    Task,
    Verdict,
    check_choice,
    check_int,
    check_number,
    register_task,
)
from vpd_lightning.tasks.parsing import extract_code, extract_tagged_answer, parse_number
from vpd_lightning.tasks.records import check_fraction, load_split, prompt_problem, read_jsonl
from vpd_lightning.tasks.sandbox.harness import RESPONSE, TESTS, run_tests, truncate
from vpd_lightning.tasks.sandbox.judge import run_judged
from vpd_lightning.tasks.sandbox.runner import SandboxLimits, launch_plan

MATCH_MODES = ("auto", "exact", "numeric")
FEEDBACK_LEVELS = ("outcome", "solution")


@register_task
class JsonlTask(Task):
    """Prompts with answers or tests from ``path`` (a JSONL file, or a directory of split files)."""

    name = "jsonl"
    runs_code = True

    def __init__(
        self,
        path: str,
        match: str = "auto",
        feedback: Literal["outcome", "solution"] = "outcome",
        rel_tol: float = 1e-6,
        test_fraction: float = 0.1,
        seed: int = 0,
        timeout_s: float = 10.0,
        memory_mb: int = 4096,
        feedback_chars: int = 600,
        isolate_network: bool = True,
    ) -> None:
        """``match`` (auto, exact or numeric) is a plain string, checked here, so a wrong one is
        refused with its key named."""
        check_choice("match", match, MATCH_MODES)
        check_choice("feedback", feedback, FEEDBACK_LEVELS)
        check_number("rel_tol", rel_tol, 0, "must be a number >= 0")
        check_int("feedback_chars", feedback_chars, 20)
        check_fraction(test_fraction)
        self.path, self.match, self.feedback, self.rel_tol = path, match, feedback, rel_tol
        self.test_fraction, self.seed, self.feedback_chars = test_fraction, seed, feedback_chars
        self.limits = SandboxLimits.for_tests(timeout_s, memory_mb, isolate_network)
        launch_plan()  # probe the sandbox now, so a weak mode is announced at start
        self._check_files()

    def records(self, split: str) -> list[Record]:
        return load_split(self.path, split, self.test_fraction, self.seed, check_record)

    def _check_files(self) -> None:
        """Read every file now, so a bad line stops the run before the model loads."""
        path = Path(self.path).expanduser()
        if not path.exists():
            raise UserInputError(f"data.task.path = {self.path!r}: no such file or directory")
        files = [path] if path.is_file() else [path / f"{split}.jsonl" for split in SPLITS]
        for file in files:
            if path.is_dir() and not file.is_file():
                raise UserInputError(
                    f"data.task.path = {self.path!r}: a directory needs train.jsonl and "
                    f"test.jsonl; {file.name} is missing"
                )
            read_jsonl(file, check_record)

    @property
    def feedback_reveals_answer(self) -> bool:
        return self.feedback == "solution"

    def reference_solution(self, record: Record) -> str | None:
        if "answer" in record:
            return str(record["answer"])
        return record.get("solution")

    def verify(self, record: Record, completion: str) -> Verdict:
        if "tests" in record:
            return self._verify_tests(record, completion)
        return self._verify_answer(record, completion)

    def _matches(self, given: str, expected: str) -> bool:
        if self.match != "exact":
            a, b = parse_number(given), parse_number(expected)
            if a is not None and b is not None:
                return math.isclose(a, b, rel_tol=self.rel_tol, abs_tol=self.rel_tol)
            if self.match == "numeric":
                return False
        return given.strip() == expected.strip()

    def _verify_answer(self, record: Record, completion: str) -> Verdict:
        expected = str(record["answer"])
        given = extract_tagged_answer(completion)
        info = {"answer": given, "expected": expected}
        if given is None:
            return Verdict(
                0.0, "Format error: put the final answer inside <answer>...</answer>.", info
            )
        if self._matches(given, expected):
            return Verdict(1.0, "Correct.", info)
        text = f"Your answer {given!r} is incorrect."
        if self.feedback == "solution":
            text += f" The correct answer is {expected}."
        return Verdict(0.0, text, info)

    def _verify_tests(self, record: Record, completion: str) -> Verdict:
        tests = record["tests"]
        source = "\n".join(tests) if isinstance(tests, list) else str(tests)
        entry_point = record.get("entry_point")
        code = extract_code(completion, entry_point)
        if entry_point:  # judge mode: only the response runs in the sandbox
            outcome = run_judged(
                [(RESPONSE, code)], [(TESTS, source)], entry_point=entry_point, limits=self.limits
            )
        else:  # script mode: the tests run in the response's process
            outcome = run_tests([(RESPONSE, code)], [(TESTS, source)], limits=self.limits)
        return Verdict(
            1.0 if outcome.passed else 0.0,
            truncate(outcome.feedback, self.feedback_chars),
            outcome.info,
        )


def check_record(record: Record) -> str | None:
    """What is wrong with one JSONL record, or None. Tests are checked as verification will use
    them: records whose tests pay a wrong answer (they assert nothing), fail every answer (they do
    not compile) or would crash the training step (an ``entry_point`` that is not a name) are
    refused here, when the file is read."""
    problem = prompt_problem(record.get("prompt"))
    if problem:
        return problem
    if ("answer" in record) == ("tests" in record):
        return "needs exactly one of `answer` and `tests`"
    if "tests" in record:
        return _tests_problem(record["tests"], record.get("entry_point"))
    return None


def _tests_problem(tests: object, entry_point: object) -> str | None:
    """What makes ``tests`` (and ``entry_point``; None or absent: the script mode) unusable for
    verification, or None."""
    if entry_point is not None and not (
        isinstance(entry_point, str) and entry_point.isidentifier() and not iskeyword(entry_point)
    ):
        return (
            f"`entry_point` = {_short(entry_point)}: must be the name of the function under "
            "test (a Python identifier, as a string); drop the key to run the tests as a script"
        )
    lines_ok = isinstance(tests, list) and all(isinstance(line, str) for line in tests)
    if not (isinstance(tests, str) or lines_ok):
        return (
            f"`tests` = {_short(tests)}: must be Python source, a string or a list of strings "
            "(lines)"
        )
    source = "\n".join(tests) if isinstance(tests, list) else tests
    try:
        tree = ast.parse(source, "<tests>")
    except (SyntaxError, ValueError) as exc:  # ValueError: a null byte
        where = f" (line {exc.lineno})" if getattr(exc, "lineno", None) else ""
        why = exc.msg if isinstance(exc, SyntaxError) else str(exc)
        return f"`tests` do not compile{where}: {why}; every answer would fail them"
    nodes = list(ast.walk(tree))
    if not any(isinstance(node, ast.Assert | ast.Raise) for node in nodes):
        return (
            f"`tests` = {_short(source)}: assert nothing (no `assert` or `raise` statement), "
            "so every answer would pass; write asserts on the answer's results"
        )
    if entry_point is not None and not any(
        isinstance(node, ast.Name) and node.id == entry_point for node in nodes
    ):
        return (
            f"`tests` never use the `entry_point` {entry_point!r}, so every answer would get the "
            "same reward; call it in the asserts"
        )
    return None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
