"""Held-out accuracy as torchmetrics metrics, summed across processes."""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric


def unbiased_pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. (2021): 1 - C(n-c, k) / C(n, k), the chance one of k of the n samples passes."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


class MeanAtN(Metric):
    """Mean reward over n samples per prompt, averaged over prompts (mean@n)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state(
            "total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, rewards: torch.Tensor) -> None:
        """rewards: (prompts, n)."""
        # Out-of-place: states may be inference tensors after a validation run.
        self.total = self.total + rewards.to(torch.float64).mean(dim=1).sum()
        self.count = self.count + rewards.shape[0]

    def compute(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1)


class PassAtK(Metric):
    """Unbiased pass@k over n >= k samples per prompt; a sample passes when its reward is at
    least `success_threshold`."""

    full_state_update = False

    def __init__(self, k: int, success_threshold: float = 1.0) -> None:
        super().__init__()
        self.k = k
        self.success_threshold = success_threshold
        self.add_state(
            "total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, rewards: torch.Tensor) -> None:
        """rewards: (prompts, n)."""
        n = rewards.shape[1]
        passed = (rewards >= self.success_threshold).sum(dim=1).tolist()
        self.total = self.total + sum(unbiased_pass_at_k(n, c, self.k) for c in passed)
        self.count = self.count + rewards.shape[0]

    def compute(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1)


class RepairRate(Metric):
    """Of the student's failed attempts, the fraction the teacher then gets right (NaN before any
    failure was seen): how much the feedback on a wrong attempt helps, with no answer shown."""

    full_state_update = False

    def __init__(self, success_threshold: float = 1.0) -> None:
        super().__init__()
        self.success_threshold = success_threshold
        self.add_state(
            "fixed", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("failed", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, student_rewards: torch.Tensor, teacher_rewards: torch.Tensor) -> None:
        """Rewards of the same attempts, any shape: the student's and the teacher's after it."""
        failed = student_rewards < self.success_threshold
        fixed = failed & (teacher_rewards >= self.success_threshold)
        self.fixed = self.fixed + fixed.sum().to(torch.float64)
        self.failed = self.failed + failed.sum()

    def compute(self) -> torch.Tensor:
        if self.failed == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self.fixed / self.failed
