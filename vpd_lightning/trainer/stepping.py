"""The mechanics of every optimizer step, in one place: the backward share, skipping updates whose
loss is not finite (and stopping a run that keeps producing them), clipping, stepping, schedulers.

`Stepper` is the `UpdateRunner` that the algorithm's batch updates run with (`algorithm/batches.py`):
it is where they meet Lightning's strategy and the module's optimizers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import lightning.pytorch as pl
import torch
from torch.distributed.tensor import DTensor

from vpd_lightning.algorithm.batches import Role
from vpd_lightning.trainer.distributed import sum_over_processes


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


class Stepper:
    """Backward, sums over processes and optimizer steps for one LightningModule's two roles.

    Optimizer 0 is the student's and optimizer 1 (VPD) the teacher's; `schedulers[role]` is the
    scheduler of that role, or None.
    """

    ROLES: tuple[Role, ...] = ("student", "teacher")

    def __init__(self, module: pl.LightningModule, guard: NonFiniteGuard, clip: dict) -> None:
        self.module = module
        self.guard = guard
        self.clip = clip  # role -> max gradient norm or None

    def sum(self, values: Sequence[float]) -> list[float]:
        return sum_over_processes(self.module.trainer.strategy, values)

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate this process's share of a loss normalised by global counts: DDP and
        FSDP2 average gradients over processes, so the world size makes it the global sum."""
        self.module.manual_backward(loss * self.module.trainer.world_size)

    def all_finite(self, loss: float) -> bool:
        """Whether every process's loss is finite (one non-finite loss skips the update)."""
        finite = math.isfinite(loss)
        return bool(self.module.trainer.strategy.reduce_boolean_decision(finite, all=True))

    def step(self, role: Role, loss: float, counted: bool) -> tuple[float, bool]:
        """Clip, step and zero `role`'s optimizer; (grad norm, whether the update was skipped).

        A non-finite loss on any process skips the update: the gradients are dropped and a
        counted step still advances `global_step` (an optimizer step without gradients changes
        nothing), so `max_steps` bounds a run whatever its losses. Uncounted steps (the teacher's,
        extra student updates) go through the strategy, so precision plugins apply.
        """
        finite = self.all_finite(loss)
        module = self.module
        optimizer, scheduler = self.optimizer_and_scheduler(role)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grad_norm = gradient_norm(params)
        self.guard.record(role, finite, module.global_step)
        clip = self.clip[role]
        if not finite:
            optimizer.zero_grad(set_to_none=True)
        elif clip is not None:
            module.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        if counted:
            optimizer.step()
        elif finite:
            module.trainer.strategy.optimizer_step(optimizer.optimizer, closure=_no_closure)
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None and (counted or finite):
            scheduler.step()
        return grad_norm, not finite

    def optimizer_and_scheduler(self, role: Role):
        """(Lightning optimizer, scheduler or None) of `role`."""
        index = self.ROLES.index(role)
        optimizers = _as_list(self.module.optimizers())
        schedulers = self.module.lr_schedulers()
        schedulers = [] if schedulers is None else _as_list(schedulers)
        present = [i for i, has in enumerate(self.module.has_scheduler[: len(optimizers)]) if has]
        scheduler = schedulers[present.index(index)] if index in present else None
        return optimizers[index], scheduler


def gradient_norm(params: list) -> float:
    """The global gradient norm (under FSDP2 the gradients are shards: their norm is reduced)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _no_closure() -> None:
    return None
