"""The user's own JSONL data: answer match (exact and numeric) and Python tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vpd_lightning.errors import UserInputError
from vpd_lightning.tasks import JsonlTask, load_task


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def answers(tmp_path) -> str:
    rows = [{"prompt": f"What is {i} + 0.5?", "answer": str(i + 0.5)} for i in range(20)]
    rows.append({"prompt": [{"role": "user", "content": "Capital of France?"}], "answer": "Paris"})
    return write(tmp_path / "answers.jsonl", rows)


def test_single_file_is_split_by_seed(answers):
    task = JsonlTask(path=answers, test_fraction=0.25, seed=0)
    train, test = task.records("train"), task.records("test")
    assert len(train) + len(test) == 21 and len(test) == 5
    assert test == JsonlTask(path=answers, test_fraction=0.25, seed=0).records("test")


@pytest.mark.parametrize(
    ("match", "given", "expected", "reward"),
    [
        ("auto", "3.50", "3.5", 1.0),
        ("auto", "3.5000001", "3.5", 1.0),
        ("auto", "3.6", "3.5", 0.0),
        ("numeric", "1,000", "1000", 1.0),
        ("numeric", "Paris", "Paris", 0.0),
        ("exact", "3.50", "3.5", 0.0),
        ("exact", " Paris ", "Paris", 1.0),
        ("auto", "paris", "Paris", 0.0),
    ],
)
def test_answer_matching(answers, match, given, expected, reward):
    task = JsonlTask(path=answers, match=match)
    verdict = task.verify({"prompt": "q", "answer": expected}, f"so <answer>{given}</answer>")
    assert verdict.reward == reward


def test_answer_feedback_levels(answers):
    record = {"prompt": "q", "answer": "42"}
    assert (
        JsonlTask(path=answers).verify(record, "<answer>41</answer>").feedback
        == "Your answer '41' is incorrect."
    )
    solution = JsonlTask(path=answers, feedback="solution").verify(record, "<answer>41</answer>")
    assert solution.feedback.endswith("The correct answer is 42.")
    assert JsonlTask(path=answers).verify(record, "42").feedback.startswith("Format error")
    assert JsonlTask(path=answers).reference_solution(record) == "42"


@pytest.fixture
def code(tmp_path) -> str:
    (tmp_path / "code").mkdir()
    row = {
        "prompt": "Write square(x).",
        "entry_point": "square",
        "tests": ["assert square(2) == 4", "assert square(-3) == 9"],
    }
    plain = {"prompt": "Write cube(x).", "tests": "assert cube(2) == 8\nassert cube(3) == 27"}
    write(tmp_path / "code" / "train.jsonl", [row, plain])
    write(tmp_path / "code" / "test.jsonl", [row])
    return str(tmp_path / "code")


def test_tests_mode(code):
    task = load_task("jsonl", path=code, timeout_s=3.0)
    square, cube = task.records("train")
    assert task.verify(square, "```python\ndef square(x):\n    return x * x\n```").reward == 1.0
    wrong = task.verify(square, "def square(x):\n    return 2 * x")
    assert wrong.reward == 0.0 and "Test failed: assert square(-3) == 9" in wrong.feedback
    assert "square(-3) returned -6" in wrong.feedback
    assert task.verify(cube, "def cube(x):\n    return x ** 3").reward == 1.0
    cheat = task.verify(cube, "import os\nos._exit(0)")
    assert cheat.reward == 0.0 and "before the tests finished" in cheat.feedback
    missing = task.verify(square, "def other(x):\n    return x")
    assert "does not define the function `square`" in missing.feedback
    assert task.reference_solution(square) is None


def test_bad_records_and_options(tmp_path, answers):
    both = write(tmp_path / "both.jsonl", [{"prompt": "q", "answer": "1", "tests": "assert 1"}] * 3)
    with pytest.raises(ValueError, match="exactly one of `answer` and `tests`"):
        JsonlTask(path=both).records("train")
    no_prompt = write(tmp_path / "np.jsonl", [{"answer": "1"}] * 3)
    with pytest.raises(ValueError, match="needs `prompt`"):
        JsonlTask(path=no_prompt).records("train")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "q", "answer": "1"}\nnot json\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2"):
        JsonlTask(path=str(broken)).records("train")
    with pytest.raises(UserInputError, match="no such file"):
        JsonlTask(path=str(tmp_path / "missing.jsonl"))
    for options, message in [
        ({"match": "fuzzy"}, "match"),
        ({"feedback": "hint"}, "feedback"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"rel_tol": -1}, "rel_tol"),
    ]:
        with pytest.raises(ValueError, match=message):
            JsonlTask(path=answers, **options)
