"""The one error type for bad user input: the CLI prints its message as a single line.

Every check of options, data files, model ids and checkpoints raises `UserInputError` with a
message that names the key or file, the value given, and what is accepted; `python -m
vpd_lightning` prints it without a traceback (set `VPD_TRACEBACK=1` to see one).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal, get_args, get_origin


class UserInputError(ValueError):
    """Input the user can fix: a bad option, data file, model id or checkpoint."""


def require(condition: bool, key: str, value: object, accepted: str) -> None:
    """Raise `UserInputError("key = value: accepted")` unless `condition` holds."""
    if not condition:
        raise UserInputError(f"{key} = {value!r}: {accepted}")


# The one vocabulary of value rules: option groups (`options.py`), methods and tasks (whose keys
# are `data.task.init_args.NAME`, `tasks.base.option`) all say them with these.


def require_choice(key: str, value: object, choices: Iterable | type) -> None:
    """`value` is one of `choices` (a sequence, or a `Literal` type's values)."""
    allowed = get_args(choices) if get_origin(choices) is Literal else tuple(choices)
    require(value in allowed, key, value, f"must be one of {', '.join(map(str, allowed))}")


def require_int(key: str, value: object, low: int = 1) -> None:
    """A whole number >= `low` (a bool is not one)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    require(ok, key, value, f"must be an integer >= {low}")


def require_finite(
    key: str, value: object, low: float, high: float = math.inf, rule: str = ""
) -> None:
    """A finite number in [low, high] (a bool is not one); `rule` says which ends are open."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and low <= value <= high
    require(ok, key, value, rule or f"must be a finite number in [{low}, {high}]")
