"""Task data files are refused when read, naming file:line, the value and the rule (issue 30):
JSONL code records whose tests could not verify an answer, and lines or files whose parsed records
would take far more memory than their size suggests. Each case was accepted before."""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path

import pytest

from vpd_lightning.errors import UserInputError
from vpd_lightning.tasks import JsonlTask, SciKnowEvalTask
from vpd_lightning.tasks import records as records_module
from vpd_lightning.tasks.records import read_jsonl

MAX_LINE_BYTES = 4 * 1024 * 1024  # records.MAX_LINE_BYTES, checked below
GOOD = {"prompt": "Write f.", "tests": "assert f(1) == 2", "entry_point": "f"}


def write(path: Path, rows: list[dict | bytes]) -> str:
    lines = [row if isinstance(row, bytes) else json.dumps(row).encode() for row in rows]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        # tests that assert nothing: every answer, however wrong, was paid 1
        ({"tests": ""}, "assert nothing"),
        ({"tests": "# f(1) == 2"}, "assert nothing"),
        ({"tests": "f(1) == 2", "entry_point": "f"}, "assert nothing"),
        ({"tests": {"f(1)": 2}}, "must be Python source"),
        ({"tests": 2}, "must be Python source"),
        ({"tests": ["assert f(1) == 2", None]}, "must be Python source"),
        ({"tests": "assert True"}, "never use the `entry_point` 'f'"),
        # tests that do not compile: every answer, however right, was paid 0
        ({"tests": "assert f(1) =="}, r"do not compile \(line 1\)"),
        ({"tests": "assert f(1) == 2\n  assert f(2) == 3"}, r"do not compile \(line 2\)"),
        ({"tests": "assert f('\0') == 2"}, "do not compile"),
        # an entry point that is not a name: verify raised, which would crash the training step
        ({"entry_point": 3}, "`entry_point` = 3: must be the name"),
        ({"entry_point": ["f"]}, "must be the name"),
        ({"entry_point": "def"}, "must be the name"),
    ],
)
def test_jsonl_tests_that_cannot_verify_an_answer_are_refused_at_load(tmp_path, change, rule):
    path = write(tmp_path / "code.jsonl", [GOOD, GOOD, {**GOOD, **change}])
    with pytest.raises(UserInputError, match=rf"code\.jsonl:3: .*{rule}"):
        JsonlTask(path=path)


def test_jsonl_tests_that_verify_are_accepted(tmp_path):
    rows = [
        GOOD,
        {"prompt": "p", "tests": ["assert f(1) == 2", "assert f(2) == 3"], "entry_point": "f"},
        {"prompt": "p", "tests": "if f(1) != 2:\n    raise AssertionError('f(1)')"},
        {"prompt": "p", "tests": "x = 1\nassert x == 1"},  # script mode: the response's globals
        {"prompt": "p", "tests": "assert g() == 1", "entry_point": None},  # null: script mode
    ]
    task = JsonlTask(path=write(tmp_path / "ok.jsonl", rows))
    assert len(task.records("train")) + len(task.records("test")) == 5


def test_a_50_mb_line_is_refused_before_it_is_read_whole(tmp_path):
    # Before: a 50 MB line of empty dicts took 6 GB to parse; a 12 MB one took about 1 GB.
    big = tmp_path / "big.jsonl"
    filler = b'{"prompt": "q", "answer": "1", "x": [' + b"{}," * (4 * 1024 * 1024) + b"{}]}"
    write(big, [{"prompt": "q", "answer": "1"}, filler])
    tracemalloc.start()
    try:
        with pytest.raises(
            UserInputError, match=rf"big\.jsonl:2: a line of more than {MAX_LINE_BYTES} bytes"
        ):
            JsonlTask(path=str(big))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * MAX_LINE_BYTES, peak
    assert records_module.MAX_LINE_BYTES == MAX_LINE_BYTES


def test_a_record_of_too_many_values_is_refused_before_it_is_parsed(tmp_path):
    # 3.6 MB of empty lists (1.2 million values, about 80 MB parsed): under the line limit.
    many = tmp_path / "many.jsonl"
    write(many, [b'{"prompt": "q", "answer": "1", "x": [' + b"[]," * 1_200_000 + b"[]]}"])
    start = time.monotonic()
    with pytest.raises(
        UserInputError, match=r"many\.jsonl:1: a record of more than 100000 JSON values"
    ):
        JsonlTask(path=str(many))
    assert time.monotonic() - start < 2.0
    # commas and brackets inside strings are text, not values
    prose = {"prompt": "[a, b: {c}], " * 60_000, "answer": "1"}
    JsonlTask(path=write(tmp_path / "prose.jsonl", [prose, prose]))


def test_a_file_is_bounded_in_bytes_and_values(tmp_path, monkeypatch):
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(100)]
    path = tmp_path / "rows.jsonl"
    write(path, rows)
    monkeypatch.setattr(records_module, "MAX_FILE_VALUES", 300)  # 5 values a record
    with pytest.raises(UserInputError, match=r"rows\.jsonl:61: the file passes 300 JSON values"):
        read_jsonl(path)
    monkeypatch.setattr(records_module, "MAX_FILE_BYTES", 1000)
    with pytest.raises(UserInputError, match=r"rows\.jsonl:\d\d: the file passes 1000 bytes here"):
        read_jsonl(path)


def test_nesting_is_bounded(tmp_path):
    deep = {"prompt": "q", "answer": "1", "x": json.loads("[" * 40 + "]" * 40)}
    with pytest.raises(UserInputError, match=r"deep\.jsonl:1: `x` is nested more than 32 deep"):
        JsonlTask(path=write(tmp_path / "deep.jsonl", [deep]))


def test_sciknoweval_files_have_the_same_bounds(tmp_path):
    question = {"prompt": "Q?\nA: x\nB: y", "answer": "A"}
    write(tmp_path / "train.jsonl", [question])
    write(
        tmp_path / "test.jsonl", [question, b'{"prompt": "' + b"x" * (MAX_LINE_BYTES + 1) + b'"}']
    )
    with pytest.raises(UserInputError, match=r"test\.jsonl:2: a line of more than"):
        SciKnowEvalTask(path=str(tmp_path))
