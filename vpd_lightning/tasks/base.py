"""The task interface: records in, verdicts out, plus the registry behind ``load_task``."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from vpd_lightning.errors import require_choice, require_finite, require_int

Record = dict[str, Any]
SPLITS = ("train", "test")
TRUNCATION_MARK = " ...[truncated]"  # ends any feedback or context text that was cut short


def option(name: str) -> str:
    """The config key of a task constructor's argument, as errors name it."""
    return f"data.task.init_args.{name}"


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    """`errors.require_choice` for the task's argument `name`."""
    require_choice(option(name), value, choices)


def check_int(name: str, value: object, low: int) -> None:
    """`errors.require_int` for the task's argument `name`."""
    require_int(option(name), value, low)


def check_number(name: str, value: object, low: float, rule: str) -> None:
    """`errors.require_finite` (>= ``low``) for the task's argument `name`."""
    require_finite(option(name), value, low, math.inf, rule)


@dataclass(frozen=True)
class Verdict:
    """A verifier's judgement of one response.

    ``reward`` is in [0, 1]; ``feedback`` is what a teacher may be shown about the attempt ("" when
    the task has nothing to say); ``info`` holds details for logging only.
    """

    reward: float
    feedback: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.reward <= 1.0:
            raise ValueError(f"Verdict.reward must be in [0, 1], got {self.reward}")


class Task(ABC):
    """A source of prompts and a verifier for responses to them.

    Subclasses set ``name`` and ``runs_code`` (whether ``verify`` starts subprocesses, which
    :func:`verify_many` then runs in parallel).
    """

    name: str = ""
    runs_code: bool = False

    @abstractmethod
    def records(self, split: str) -> list[Record]:
        """The records of ``split`` ("train" or "test"); each has "prompt" and maybe "system"."""

    @abstractmethod
    def verify(self, record: Record, completion: str) -> Verdict:
        """Score ``completion`` (the model's whole response text) for ``record``."""

    @property
    def feedback_reveals_answer(self) -> bool:
        """Whether the feedback on a wrong attempt can state the correct answer (then it cannot
        measure how much feedback helps a teacher: `validation.teacher` refuses it)."""
        return False

    def reference_solution(self, record: Record) -> str | None:
        """A correct answer to show a teacher (OPSD's context), or None when the task has none."""
        return None

    @staticmethod
    def check_split(split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


TASKS: dict[str, type[Task]] = {}
T = TypeVar("T", bound=type[Task])


def register_task(cls: T) -> T:
    """Class decorator: make ``cls`` loadable by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name` to be registered")
    TASKS[cls.name] = cls
    return cls


def load_task(name: str, **options: Any) -> Task:
    """Build the registered task ``name`` with ``options`` (its constructor's keyword arguments)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; registered tasks: {sorted(TASKS)}")
    return TASKS[name](**options)


def verify_many(
    task: Task,
    records: Sequence[Record],
    completions: Sequence[str],
    *,
    workers: int = 4,
) -> list[Verdict]:
    """Verify ``completions[i]`` against ``records[i]`` for all i, in order.

    Code tasks run on a pool of ``workers`` threads, each waiting on its own sandboxed subprocess, so
    at most ``workers`` programs run at once. Cheap tasks run inline.
    """
    if len(records) != len(completions):
        raise ValueError(f"{len(records)} records but {len(completions)} completions")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    verify: Callable[[Record, str], Verdict] = task.verify
    if not task.runs_code or workers == 1 or len(records) <= 1:
        return [verify(r, c) for r, c in zip(records, completions, strict=True)]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify") as pool:
        return list(pool.map(verify, records, completions))
