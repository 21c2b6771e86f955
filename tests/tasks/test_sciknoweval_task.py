"""SciKnowEval multiple choice: the verifier on local files, and the team's real splits where they
sit beside the project (the project ships no data; that one test needs them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vpd_lightning.errors import UserInputError
from vpd_lightning.tasks import SciKnowEvalTask, load_task

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "sciknoweval"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"no SciKnowEval splits at {SHARED}")
SIZES = {
    "chemistry": (1890, 210),
    "physics": (720, 80),
    "biology": (450, 50),
    "material": (841, 94),
}


@needs_shared
@pytest.mark.parametrize("domain", sorted(SIZES))
def test_shared_splits_load_and_verify(domain):
    task = load_task("sciknoweval", path=str(SHARED / domain))
    train, test = task.records("train"), task.records("test")
    assert (len(train), len(test)) == SIZES[domain]
    record = test[0]
    assert record["system"] and record["answer"] in "ABCD"
    right = f"<reasoning>...</reasoning>\n<answer>\n{record['answer']}\n</answer>"
    assert task.verify(record, right).reward == 1.0
    assert task.reference_solution(record) == record["answer"]


def test_domains_are_concatenated(tmp_path):
    row = {"prompt": "Pick one.\n\nA: x\nB: y\nC: z\nD: w", "answer": "C"}
    for domain, n in (("biology", 5), ("physics", 8), ("material", 3)):
        (tmp_path / domain).mkdir()
        (tmp_path / domain / "train.jsonl").write_text(json.dumps(row) + "\n")
        (tmp_path / domain / "test.jsonl").write_text((json.dumps(row) + "\n") * n)
    task = SciKnowEvalTask(path=str(tmp_path), domains=["biology", "physics"])
    assert len(task.records("test")) == 5 + 8


@pytest.fixture
def mcq(tmp_path) -> Path:
    rows = [
        {"prompt": "Pick one.\n\nA: x\nB: y\nC: z\nD: w", "answer": "C", "system": "Answer."}
    ] * 5
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "test.jsonl").write_text(json.dumps(rows[0]) + "\n")
    return tmp_path


@pytest.mark.parametrize(
    ("level", "response", "reward", "feedback"),
    [
        ("outcome", "<answer>C</answer>", 1.0, "Correct: C is the answer."),
        ("outcome", "<answer>(c)</answer>", 1.0, "Correct: C is the answer."),
        ("outcome", "<answer>B</answer>", 0.0, "Your answer B is incorrect."),
        ("eliminate", "<answer>B: y</answer>", 0.0, "B is not the answer."),
        ("eliminate", "C", 0.0, "Format error: put exactly one option letter (A, B, C, D)"),
        ("outcome", "<answer>E</answer>", 0.0, "Format error"),
    ],
)
def test_feedback_levels(mcq, level, response, reward, feedback):
    task = SciKnowEvalTask(path=str(mcq), feedback=level)
    verdict = task.verify(task.records("test")[0], response)
    assert verdict.reward == reward and verdict.feedback.startswith(feedback)


def test_missing_path_and_bad_options(tmp_path, mcq):
    with pytest.raises(UserInputError, match="does not exist"):
        SciKnowEvalTask(path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="feedback"):
        SciKnowEvalTask(path=str(mcq), feedback="hint")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train.jsonl").write_text('{"prompt": "q", "answer": "maybe"}\n')
    with pytest.raises(UserInputError, match=r"bad/train\.jsonl:1: `answer` must be an option"):
        SciKnowEvalTask(path=str(tmp_path / "bad"))  # read when built, before a model loads
    (tmp_path / "bad" / "train.jsonl").write_text('{"prompt": "q", "answer": "A"}\n')
    with pytest.raises(UserInputError, match=r"test\.jsonl"):
        SciKnowEvalTask(path=str(tmp_path / "bad"))
