"""What a batch update needs: rollouts cut into packed micro-batches, and the loop's services.

The M-step and E-step are batch updates that accumulate gradients over micro-batches (memory bounded
by one) with losses normalised by counts over every process. They run without Lightning: the
training loop hands them an `UpdateRunner` (`trainer/stepping.py` implements it) for the three things
that depend on the strategy: sums over processes, the backward pass and the optimizer step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from vpd_lightning.policy.packing import PackedBatch, pack
from vpd_lightning.rollout.sampling import Rollout

Role = Literal["student", "teacher"]


class UpdateRunner(Protocol):
    """The training loop's side of a batch update."""

    def sum(self, values: Sequence[float]) -> list[float]:
        """Each value summed over every process (the identity with one process)."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate this process's share of a loss normalised by global counts."""
        ...

    def step(self, role: Role, loss: float, counted: bool) -> tuple[float, bool]:
        """Finish one update whose loss on this process was `loss`: skip it if any process's
        loss is not finite, else clip and step `role`'s optimizer; `counted` steps count as a
        training step. Returns (gradient norm, skipped)."""
        ...


@dataclass
class MicroBatch:
    """Rollouts packed twice: after the student's prompt and after the teacher's (its context)."""

    rollouts: list[Rollout]
    student: PackedBatch
    teacher: PackedBatch | None  # None: no pass reads the teacher's prompts (GRPO)

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) response lengths, on the batch's device."""
        device = self.student.targets.device
        return torch.tensor([len(r.completion_ids) for r in self.rollouts], device=device)

    @property
    def sampler_logprobs(self) -> torch.Tensor | None:
        """(T,) the sampling engine's log-prob of each completion token, in `student.targets`'
        order; None where the engine reports none."""
        if any(r.sampler_logprobs is None for r in self.rollouts):
            return None
        values = [p for r in self.rollouts for p in r.sampler_logprobs]
        return torch.tensor(values, dtype=torch.float32, device=self.student.targets.device)

    @property
    def has_context(self) -> torch.Tensor:
        """(B,) whether each rollout's teacher saw a context (the others are not trained on)."""
        return torch.tensor([r.has_context for r in self.rollouts])


def micro_batches(
    rollouts: Sequence[Rollout],
    size: int,
    pad_id: int,
    device: torch.device | str,
    with_teacher: bool = True,
) -> list[MicroBatch]:
    """Consecutive groups of `size` rollouts, each packed (and, `with_teacher`, packed again after
    the teacher's prompts) on `device`."""
    out = []
    for start in range(0, len(rollouts), size):
        micro = list(rollouts[start : start + size])
        completions = [r.completion_ids for r in micro]
        student = pack([r.prompt_ids for r in micro], completions, pad_id, device)
        teacher = (
            pack([r.teacher_prompt_ids for r in micro], completions, pad_id, device)
            if with_teacher
            else None
        )
        out.append(MicroBatch(micro, student, teacher))
    return out


def completion_tokens(rollouts: Sequence[Rollout], with_context_only: bool = False) -> int:
    """Response tokens of this process's rollouts (of those with a context, if asked)."""
    return sum(len(r.completion_ids) for r in rollouts if r.has_context or not with_context_only)
