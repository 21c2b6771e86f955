"""Reading user JSONL data and splitting it reproducibly."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from vpd_lightning.errors import UserInputError
from vpd_lightning.tasks.base import Record, Task

T = TypeVar("T")


def read_jsonl(path: Path, check: Callable[[Record], str | None] | None = None) -> list[Record]:
    """One JSON object per non-blank line. Errors name the file and the line number in it;
    `check(record)` returns what is wrong with a record, or None."""
    records = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserInputError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise UserInputError(
                    f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}"
                )
            problem = check(record) if check is not None else None
            if problem:
                raise UserInputError(f"{path}:{lineno}: {problem}")
            records.append(record)
    if not records:
        raise UserInputError(f"{path}: the file has no records (one JSON object per line)")
    return records


def seeded_split(items: Sequence[T], split: str, test_fraction: float, seed: int) -> list[T]:
    """A fixed shuffle by ``seed``; the first ``test_fraction`` (at least one item) is "test"."""
    Task.check_split(split)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(test_fraction * len(items))) if items else 0
    chosen = order[:n_test] if split == "test" else order[n_test:]
    return [items[i] for i in sorted(chosen)]


def check_fraction(test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise UserInputError(f"test_fraction = {test_fraction}: must be in (0, 1)")


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
