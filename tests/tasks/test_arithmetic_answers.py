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
import re
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


HELD_OUT = [
    json.loads(line)
    for line in (FIXTURE.parent / "smollm2_arithmetic_heldout.jsonl").read_text().splitlines()
]


def last_integer(text: str) -> int | None:
    """The rule the parser replaced: the last integer anywhere in the response."""
    found = re.findall(r"-?\d+", text)
    return int(found[-1]) if found else None


def test_on_held_out_responses_it_misquotes_less_than_the_last_integer_rule():
    """`smollm2_arithmetic_heldout.jsonl`: 48 responses to the next 24 prompts, made and labelled
    after the parser was written, so this is its out-of-sample record. Measured when the file was
    made: of 45 labelled finished responses it read 39, refused 4 and misquoted 2 (rows 3 and 42:
    a conclusion, then an aside with a new equation that it took as the answer); the last-integer
    rule was right on 40 and misquoted the other 5. Misquotes are what poison feedback."""
    labelled = [r for r in HELD_OUT if not r["truncated"] and r["label"] is not None]
    assert len(labelled) == 45
    misquoted = sum(parsed(r["response"]) not in (None, r["label"]) for r in labelled)
    old_misquoted = sum(last_integer(r["response"]) != r["label"] for r in labelled)
    read = sum(parsed(r["response"]) == r["label"] for r in labelled)
    assert misquoted <= 2 < old_misquoted == 5, (misquoted, old_misquoted)
    assert read >= 39, read
