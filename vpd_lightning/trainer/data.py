"""Prompts for training and validation.

Which prompts a training step sees is a pure function of (seed, step, rank): after a resume, the
restored `global_step` puts every process back at the same place in the data, with no sampler
state to save and nothing lost to Lightning's one-batch prefetch.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from vpd_lightning.errors import UserInputError, require_int
from vpd_lightning.tasks import Task
from vpd_lightning.trainer.seeding import mix_seed


class PromptSampler:
    """Seeded epochs of shuffled records; each step takes the next `per_rank * world` of them."""

    def __init__(self, records: list[dict], per_rank: int, seed: int) -> None:
        if not records:
            raise UserInputError("the training split is empty")
        self.records = records
        self.per_rank = per_rank
        self.seed = seed
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            self._orders = {epoch: torch.randperm(len(self.records), generator=generator).tolist()}
        return self._orders[epoch]

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> list[dict]:
        first = (step * world_size + rank) * self.per_rank
        out = []
        for position in range(first, first + self.per_rank):
            epoch, index = divmod(position, len(self.records))
            out.append(self.records[self._order(epoch)[index]])
        return out


class _StepBatches(IterableDataset):
    def __init__(self, sampler: PromptSampler, start: int, rank: int, world_size: int) -> None:
        self.sampler, self.start, self.rank, self.world_size = sampler, start, rank, world_size

    def __iter__(self) -> Iterator[list[dict]]:
        step = self.start
        while True:
            yield self.sampler.batch(step, self.rank, self.world_size)
            step += 1


def _as_list(batch: list[dict]) -> list[dict]:
    return batch


class VPDDataModule(pl.LightningDataModule):
    """Training prompts from a task's train split; held-out prompts from its evaluation split.

    Args:
        task: The task (verifier and data), e.g. `vpd_lightning.tasks.ArithmeticTask`.
        prompts_per_step: Prompts per training step on each process.
        train_split: Split the training prompts come from.
        val_split: Split for validation and test.
        val_size: Use the first `val_size` held-out prompts (None: all).
        val_batch_size: Prompts per validation batch.
        seed: Seed of the training order.
    """

    def __init__(
        self,
        task: Task,
        prompts_per_step: int = 4,
        train_split: str = "train",
        val_split: str = "test",
        val_size: int | None = 64,
        val_batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.check_options(prompts_per_step, val_size, val_batch_size)
        self.task = task
        self.prompts_per_step = prompts_per_step
        self.train_split = train_split
        self.val_split = val_split
        self.val_size = val_size
        self.val_batch_size = val_batch_size
        self.seed = seed
        self._train: PromptSampler | None = None
        self._val: list[dict] | None = None

    @staticmethod
    def check_options(prompts_per_step: int, val_size: int | None, val_batch_size: int) -> None:
        """The counts must be positive (the CLI calls this before the model loads, too)."""
        require_int("data.prompts_per_step", prompts_per_step)
        if val_size is not None:
            require_int("data.val_size", val_size)
        require_int("data.val_batch_size", val_batch_size)

    def train_records(self) -> list[dict]:
        return self.task.records(self.train_split)

    def val_records(self) -> list[dict]:
        if self._val is None:
            records = self.task.records(self.val_split)
            self._val = records[: self.val_size] if self.val_size is not None else records
            if not self._val:
                raise UserInputError(f"the {self.val_split!r} split of {self.task.name} is empty")
        return self._val

    def train_dataloader(self) -> DataLoader:
        if self._train is None:
            self._train = PromptSampler(self.train_records(), self.prompts_per_step, self.seed)
        trainer = self.trainer
        start = trainer.global_step if trainer is not None else 0
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        return DataLoader(
            _StepBatches(self._train, start, rank, world), batch_size=None, collate_fn=_as_list
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_records(), batch_size=self.val_batch_size, collate_fn=_as_list)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
