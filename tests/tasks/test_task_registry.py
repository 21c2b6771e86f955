"""The registry, the Verdict type, and building tasks from a config (jsonargparse)."""

from __future__ import annotations

import pytest
from jsonargparse import ArgumentParser

from vpd_lightning.tasks import TASKS, ArithmeticTask, Task, Verdict, load_task


def test_registry_names():
    assert set(TASKS) == {"arithmetic", "humaneval", "sciknoweval", "jsonl"}
    assert all(TASKS[name].name == name for name in TASKS)
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        load_task("chess")
    with pytest.raises(TypeError):
        load_task("arithmetic", difficulty=3)


def test_verdict_range():
    assert Verdict(1.0).reward == 1.0 and Verdict(0.5, "half").feedback == "half"
    with pytest.raises(ValueError, match="reward"):
        Verdict(1.5)


def test_tasks_build_from_a_yaml_config():
    parser = ArgumentParser()
    parser.add_argument("--task", type=Task)
    config = parser.parse_string(
        "task:\n  class_path: vpd_lightning.tasks.ArithmeticTask\n"
        "  init_args:\n    num_ops: 2\n    feedback: solution\n"
    )
    task = parser.instantiate(config).task
    assert isinstance(task, ArithmeticTask) and task.num_ops == 2 and task.feedback == "solution"
    with pytest.raises(SystemExit):
        parser.parse_string(
            "task:\n  class_path: vpd_lightning.tasks.ArithmeticTask\n  init_args:\n    feedback: hint\n"
        )
