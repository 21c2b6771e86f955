"""Skipping updates whose loss is not finite, and stopping a run that keeps producing them."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row for one of the updates."""


@dataclass
class NonFiniteGuard:
    """Counts non-finite losses per update kind ("student", "teacher"), separately.

    A run stops when any kind reaches `max_in_a_row` consecutive non-finite losses, so a student
    whose every loss is NaN stops the run however finite the teacher's losses are.
    """

    max_in_a_row: int
    in_a_row: dict[str, int] = field(default_factory=lambda: {"student": 0, "teacher": 0})
    total: dict[str, int] = field(default_factory=lambda: {"student": 0, "teacher": 0})

    def record(self, kind: str, finite: bool, step: int) -> None:
        """Count one update's outcome; warn on a skip and raise after too many in a row."""
        if finite:
            self.in_a_row[kind] = 0
            return
        self.in_a_row[kind] += 1
        self.total[kind] += 1
        warnings.warn(
            f"non-finite {kind} loss at step {step}: update skipped "
            f"({self.in_a_row[kind]} in a row, {self.total[kind]} in all)",
            stacklevel=3,
        )
        if self.in_a_row[kind] >= self.max_in_a_row:
            raise NonFiniteLossError(
                f"{self.in_a_row[kind]} non-finite {kind} losses in a row at step {step} "
                f"(model.max_nonfinite_in_a_row = {self.max_in_a_row}): stopping. Lower the "
                "learning rates, use model.dtype: float32, or check the data for empty responses."
            )

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.in_a_row = dict(state["in_a_row"])
        self.total = dict(state["total"])
