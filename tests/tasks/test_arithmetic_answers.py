"""The arithmetic answer parser on real SmolLM2-135M-Instruct responses.

`data/smollm2_arithmetic.jsonl` holds the model's own answers to the task's prompts (made once by
`data/generate_smollm2_arithmetic.py`), each labelled by hand with the number a grader reads as
the response's final answer (null: the response states none, or it was cut off at the token cap:
such responses are never parsed). Feedback that quotes a number the response did not give as its
answer misleads every method that reads it, so the parser must never misquote; where it is unsure
it may refuse (a format error), which costs only a reward.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vpd_lightning.tasks.parsing import parse_int, stated_answer

FIXTURE = Path(__file__).parent / "data" / "smollm2_arithmetic.jsonl"
ROWS = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
FINISHED = [row for row in ROWS if not row["truncated"]]


def parsed(text: str) -> int | None:
    raw = stated_answer(text)
    return parse_int(raw) if raw is not None else None


def test_the_fixture_is_real_labelled_model_output():
    assert len(FINISHED) >= 40
    assert all(set(row) == {"prompt", "expected", "response", "truncated", "label"} for row in ROWS)
    assert all(row["label"] is None or isinstance(row["label"], int) for row in ROWS)
    assert all(row["label"] is None for row in ROWS if row["truncated"])
    assert sum(row["label"] is not None for row in FINISHED) >= len(FINISHED) // 2


@pytest.mark.parametrize("row", FINISHED, ids=[row["prompt"] for row in FINISHED])
def test_the_parser_never_quotes_a_number_the_response_did_not_state(row):
    answer = parsed(row["response"])
    assert answer is None or answer == row["label"], (answer, row["label"], row["response"])


def test_the_parser_reads_the_stated_answer_of_nearly_every_response():
    """Refusals are allowed but rare: at most one labelled response in ten."""
    labelled = [row for row in FINISHED if row["label"] is not None]
    read = sum(parsed(row["response"]) == row["label"] for row in labelled)
    assert read >= 0.9 * len(labelled), f"{read} of {len(labelled)}"
