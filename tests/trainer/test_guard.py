"""Non-finite losses: counted per update kind, warned about, and stopping a run in time."""

from __future__ import annotations

import pytest

from vpd_lightning.trainer.stepping import NonFiniteGuard, NonFiniteLossError


def test_kinds_are_counted_separately_and_finite_losses_reset_only_their_own():
    guard = NonFiniteGuard(max_in_a_row=3)
    with pytest.warns(UserWarning, match="non-finite student loss at step 0"):
        guard.record("student", False, 0)
    guard.record("teacher", True, 0)  # a finite teacher loss does not reset the student's count
    with pytest.warns(UserWarning):
        guard.record("student", False, 1)
    assert guard.in_a_row == {"student": 2, "teacher": 0}
    with pytest.warns(UserWarning), pytest.raises(NonFiniteLossError, match="3 non-finite student"):
        guard.record("student", False, 2)


def test_a_finite_loss_resets_the_streak_but_not_the_total():
    guard = NonFiniteGuard(max_in_a_row=2)
    with pytest.warns(UserWarning):
        guard.record("teacher", False, 0)
    guard.record("teacher", True, 1)
    with pytest.warns(UserWarning):
        guard.record("teacher", False, 2)
    assert guard.in_a_row["teacher"] == 1 and guard.total["teacher"] == 2


def test_state_round_trips():
    guard = NonFiniteGuard(max_in_a_row=5)
    with pytest.warns(UserWarning):
        guard.record("student", False, 0)
    restored = NonFiniteGuard(max_in_a_row=5)
    restored.load_state_dict(guard.state_dict())
    assert restored == guard
