"""Reading user JSONL data and splitting it reproducibly."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from vpd_lightning.errors import UserInputError, require
from vpd_lightning.tasks.base import Record, Task, option
from vpd_lightning.tasks.sandbox.wire import count_values

T = TypeVar("T")
CHAT_ROLES = ("system", "user", "assistant")


def prompt_problem(prompt: object) -> str | None:
    """What is wrong with a record's `prompt`, or None: a non-empty string, or a non-empty list
    of chat messages, each `{"role": one of CHAT_ROLES, "content": a string}`, one from the user."""
    if isinstance(prompt, str):
        return None if prompt.strip() else "needs `prompt`: a non-empty string"
    if not (isinstance(prompt, list) and prompt):
        return "needs `prompt`: a non-empty string or a non-empty list of chat messages"
    for index, message in enumerate(prompt):
        if not (isinstance(message, dict) and isinstance(message.get("content"), str)):
            return (
                f"`prompt[{index}]` = {str(message)[:60]!r}: a chat message is an object "
                '{"role": ..., "content": "text"}'
            )
        if message.get("role") not in CHAT_ROLES:
            return (
                f"`prompt[{index}].role` = {str(message.get('role'))[:40]!r}: must be one of "
                f"{', '.join(CHAT_ROLES)}"
            )
    if not any(m["role"] == "user" for m in prompt):
        return "`prompt` has no user message: give the question as a user message"
    return None


# What one JSONL file may expand to, checked on its text before it is parsed: parsed, a record
# takes up to about 25 times its text in memory (``[{},{},...]``), so the bound is on the text
# and on its JSON values (each at most about 75 bytes of Python objects).
MAX_LINE_BYTES = 4 * 1024 * 1024
MAX_RECORD_VALUES = 100_000
MAX_FILE_BYTES = 512 * 1024 * 1024
MAX_FILE_VALUES = 5_000_000
MAX_DEPTH = 32  # nesting of a parsed record


@dataclass
class _Cost:
    """What a file has cost so far: bytes read and JSON values parsed."""

    bytes: int = 0
    values: int = 0


def jsonl_line_problem(raw: bytes, cost: _Cost) -> str | None:
    """What is too large about the next line of a JSONL file (``raw``, read with at most
    ``MAX_LINE_BYTES + 1`` bytes), checked before it is parsed, or None; adds it to ``cost``."""
    cost.bytes += len(raw)
    if len(raw) > MAX_LINE_BYTES:
        return (
            f"a line of more than {MAX_LINE_BYTES} bytes; one record may hold at most "
            f"{MAX_LINE_BYTES // 2**20} MiB of JSON: shorten it"
        )
    if cost.bytes > MAX_FILE_BYTES:
        return (
            f"the file passes {MAX_FILE_BYTES} bytes here, the most one data file may hold: "
            "split it into several files"
        )
    values = count_values(raw, MAX_RECORD_VALUES)
    if values > MAX_RECORD_VALUES:
        return (
            f"a record of more than {MAX_RECORD_VALUES} JSON values (counted on its text), the "
            "most one record may hold: shorten it"
        )
    cost.values += values
    if cost.values > MAX_FILE_VALUES:
        return (
            f"the file passes {MAX_FILE_VALUES} JSON values here, the most one data file may "
            "hold: split it into several files"
        )
    return None


def read_jsonl(path: Path, check: Callable[[Record], str | None] | None = None) -> list[Record]:
    """One JSON object per non-blank line of UTF-8 text, each line's size checked before it is
    read whole or parsed (:func:`jsonl_line_problem`). Errors name the file and the line number
    in it; `check(record)` returns what is wrong with a record, or None."""
    records = []
    cost = _Cost()
    with path.open("rb") as handle:
        lines = iter(lambda: handle.readline(MAX_LINE_BYTES + 1), b"")
        for lineno, raw in enumerate(lines, 1):
            problem = jsonl_line_problem(raw, cost)
            if problem:
                raise UserInputError(f"{path}:{lineno}: {problem}")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserInputError(
                    f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                    f"{exc.start + 1}); save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                why = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
                raise UserInputError(f"{path}:{lineno}: not valid JSON ({why})") from None
            if not isinstance(record, dict):
                raise UserInputError(
                    f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}"
                )
            problem = _not_text(record) or (check(record) if check is not None else None)
            if problem:
                raise UserInputError(f"{path}:{lineno}: {problem}")
            records.append(record)
    if not records:
        raise UserInputError(f"{path}: the file has no records (one JSON object per line)")
    return records


def _not_text(record: Record) -> str | None:
    """What in a record is not valid Unicode text (a JSON escape such as ``"\\ud800"`` decodes
    to a lone surrogate, which no tokenizer or UTF-8 writer accepts) or nested deeper than
    ``MAX_DEPTH``."""
    stack: list[tuple[str, object, int]] = [(key, value, 1) for key, value in record.items()]
    while stack:
        key, value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return f"`{key}` is nested more than {MAX_DEPTH} deep; flatten it"
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                return (
                    f"`{key}` holds a lone surrogate ({value[exc.start]!r} at character "
                    f"{exc.start + 1}), which is not text; write the character itself or drop it"
                )
        elif isinstance(value, dict):
            stack += [(key, k, depth + 1) for k in value]
            stack += [(key, v, depth + 1) for v in value.values()]
        elif isinstance(value, list):
            stack += [(key, item, depth + 1) for item in value]
    return None


def seeded_split(items: Sequence[T], split: str, test_fraction: float, seed: int) -> list[T]:
    """A fixed shuffle by ``seed``; the first ``test_fraction`` (at least one item) is "test"."""
    Task.check_split(split)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(test_fraction * len(items))) if items else 0
    chosen = order[:n_test] if split == "test" else order[n_test:]
    return [items[i] for i in sorted(chosen)]


def check_fraction(test_fraction: float) -> None:
    ok = isinstance(test_fraction, int | float) and 0.0 < test_fraction < 1.0
    require(ok, option("test_fraction"), test_fraction, "must be a number in (0, 1)")


def load_split(
    path: str | Path,
    split: str,
    test_fraction: float,
    seed: int,
    check: Callable[[Record], str | None] | None = None,
) -> list[Record]:
    """Records of ``split`` from ``path``: a directory with ``<split>.jsonl`` files, or one JSONL
    file that is split by ``seed`` (a fraction ``test_fraction`` goes to "test")."""
    Task.check_split(split)
    path = Path(path).expanduser()
    if path.is_dir():
        file = path / f"{split}.jsonl"
        if not file.is_file():
            raise UserInputError(f"{path} is a directory without {split}.jsonl")
        records = read_jsonl(file, check)
    elif path.is_file():
        records = seeded_split(read_jsonl(path, check), split, test_fraction, seed)
    else:
        raise UserInputError(f"data path {path} does not exist")
    if not records:
        raise UserInputError(f"no records for split {split!r} in {path}")
    return records
