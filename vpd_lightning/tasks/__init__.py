"""Tasks: records in, verdicts (reward and feedback text) out.

``load_task(name, **options)`` builds a registered task; ``task.records(split)`` gives prompts;
``task.verify(record, completion)`` gives a :class:`Verdict` (reward, feedback, info).
"""

from vpd_lightning.tasks.arithmetic import ArithmeticTask
from vpd_lightning.tasks.base import (
    TASKS,
    Record,
    Task,
    Verdict,
    load_task,
    register_task,
    verify_many,
)
from vpd_lightning.tasks.humaneval import HumanEvalTask
from vpd_lightning.tasks.jsonl import JsonlTask
from vpd_lightning.tasks.sandbox import SandboxLimits, launch_plan
from vpd_lightning.tasks.sciknoweval import SciKnowEvalTask

__all__ = [
    "TASKS",
    "ArithmeticTask",
    "HumanEvalTask",
    "JsonlTask",
    "Record",
    "SandboxLimits",
    "SciKnowEvalTask",
    "Task",
    "Verdict",
    "launch_plan",
    "load_task",
    "register_task",
    "verify_many",
]
