"""Reading user JSONL data and splitting it reproducibly."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from vpd_lightning.tasks.base import Record, Task

T = TypeVar("T")


def read_jsonl(path: Path) -> list[Record]:
    """One JSON object per non-blank line; errors name the file and line."""
    records = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object")
            records.append(record)
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
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")


def load_split(path: str | Path, split: str, test_fraction: float, seed: int) -> list[Record]:
    """Records of ``split`` from ``path``: a directory with ``<split>.jsonl`` files, or one JSONL
    file that is split by ``seed`` (a fraction ``test_fraction`` goes to "test")."""
    Task.check_split(split)
    path = Path(path).expanduser()
    if path.is_dir():
        file = path / f"{split}.jsonl"
        if not file.is_file():
            raise FileNotFoundError(f"{path} is a directory without {split}.jsonl")
        records = read_jsonl(file)
    elif path.is_file():
        records = seeded_split(read_jsonl(path), split, test_fraction, seed)
    else:
        raise FileNotFoundError(f"data path {path} does not exist")
    if not records:
        raise ValueError(f"no records for split {split!r} in {path}")
    return records
