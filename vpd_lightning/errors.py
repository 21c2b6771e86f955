"""The one error type for bad user input: the CLI prints its message as a single line.

Every check of options, data files, model ids and checkpoints raises `UserInputError` with a
message that names the key or file, the value given, and what is accepted; `python -m
vpd_lightning` prints it without a traceback (set `VPD_TRACEBACK=1` to see one).
"""

from __future__ import annotations


class UserInputError(ValueError):
    """Input the user can fix: a bad option, data file, model id or checkpoint."""


def require(condition: bool, key: str, value: object, accepted: str) -> None:
    """Raise `UserInputError("key = value: accepted")` unless `condition` holds."""
    if not condition:
        raise UserInputError(f"{key} = {value!r}: {accepted}")
