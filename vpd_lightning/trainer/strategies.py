"""Which Lightning strategies can train this module, and the `fsdp2` strategy name.

The module steps two optimizers by hand (student and teacher) over weights they may share. DDP
(every process holds the whole model) and FSDP2 (`fully_shard`: parameters, gradients and
optimizer states split across processes, gathered one decoder layer at a time) both allow that.
DeepSpeed and FSDP v1 own the optimizer step or flatten the parameters into one buffer per unit,
so two optimizers over the same (or half of the) parameters cannot be stepped by hand: refused.

`--trainer.strategy fsdp2` is registered here: Lightning's `ModelParallelStrategy` with every
process in one data-parallel group (no tensor parallelism), gloo on CPU and nccl on GPU. The module
applies `fully_shard` itself in `configure_model` (see `Policy.shard`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry

from vpd_lightning.errors import UserInputError
from vpd_lightning.trainer.checkpoint_files import (
    read_archive,
    verify_checksum,
    verify_folder,
    write_manifest,
)
from vpd_lightning.trainer.checkpoint_io import (
    disk_full,
    no_space,
    remove_stale_temps,
    replace_folder_atomically,
    temp_path,
)

FSDP2 = "fsdp2"
REFUSED = {
    "DeepSpeedStrategy": "DeepSpeed runs the optimizer step itself (one optimizer, one engine)",
    "FSDPStrategy": "FSDP (v1) flattens each unit's parameters into one buffer, so two "
    "optimizers cannot each step their own (or shared) parameters by hand",
}


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every process: `ModelParallelStrategy` with data parallelism only.

    Lightning's default splits a node's devices into a tensor-parallel group; this module has no
    tensor-parallel plan, so all `num_nodes * devices` processes form one data-parallel mesh.
    Checkpoints are sharded: a folder with one file of weights and optimizer states per process
    and `meta.pt` (counters, hyper-parameters, the E-step buffer); `python -m vpd_lightning
    export` turns one into a Hugging Face model folder.
    """

    strategy_name = FSDP2

    def __init__(self, **kwargs) -> None:
        for key in ("data_parallel_size", "tensor_parallel_size"):
            if key in kwargs:
                raise UserInputError(
                    f"trainer.strategy.{key} = {kwargs[key]!r}: fsdp2 shards over every process "
                    "(no tensor parallelism); remove it"
                )
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: str | Path, storage_options: Any = None
    ) -> None:
        """The sharded folder is written whole under a temporary name next to it and then swapped
        into place (`checkpoint_io.replace_folder_atomically`), never overwritten shard by shard."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        temp = Path(self.broadcast(str(temp_path(path))))
        needed = _tensor_bytes(checkpoint)
        if self.global_rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(path)
            shutil.rmtree(temp, ignore_errors=True)
        self.barrier("vpd_ckpt_begin")
        try:
            super().save_checkpoint(checkpoint, temp, storage_options)
        except Exception as error:
            if self.global_rank == 0:
                shutil.rmtree(temp, ignore_errors=True)
            if no_space(error):
                raise disk_full(path.parent, needed) from None
            raise
        self.barrier("vpd_ckpt_written")
        if self.global_rank == 0:
            write_manifest(temp)
            replace_folder_atomically(temp, path)
        self.barrier("vpd_ckpt_done")

    def load_checkpoint(
        self, checkpoint_path: str | Path, weights_only: bool | None = None
    ) -> dict:
        """Lightning's loader reads a folder's `.metadata` and non-tensor items with a full
        unpickler: every process first verifies what it will read (`checkpoint_files`)."""
        path = Path(self.broadcast(str(checkpoint_path)))
        if path.is_dir():
            verify_folder(path)
            return super().load_checkpoint(path, weights_only=True)
        checkpoint = read_archive(path)
        verify_checksum(checkpoint, path)
        return super().load_checkpoint(path, weights_only=True)


def _tensor_bytes(state: object) -> int:
    """Bytes of every tensor in a checkpoint (a DTensor counted whole): the space it needs."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_tensor_bytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(_tensor_bytes(v) for v in state)
    return 0


def is_sharded(strategy: object) -> bool:
    """Whether the module must shard itself in `configure_model` (FSDP2)."""
    return isinstance(strategy, ModelParallelStrategy)


def check_strategy(strategy: object) -> None:
    """Refuse, before training, strategies that cannot run two optimizers stepped by hand, and a
    tensor-parallel `ModelParallelStrategy` (this module only shards for data parallelism)."""
    name = type(strategy).__name__
    if name in REFUSED:
        raise UserInputError(
            f"trainer.strategy = {name}: {REFUSED[name]}. Use trainer.strategy: ddp (whole model "
            f"on every device) or {FSDP2} (sharded weights, gradients and optimizer states)"
        )
    if isinstance(strategy, ModelParallelStrategy) and not isinstance(strategy, FSDP2Strategy):
        size = strategy._tensor_parallel_size
        if size != 1:
            raise UserInputError(
                f"trainer.strategy = ModelParallelStrategy with tensor_parallel_size = {size!r}: "
                f"this module has no tensor-parallel plan; use trainer.strategy: {FSDP2}, or "
                "ModelParallelStrategy with tensor_parallel_size: 1"
            )


def register_strategies() -> None:
    """Make `--trainer.strategy fsdp2` a name Lightning knows (idempotent)."""
    if FSDP2 not in StrategyRegistry:
        StrategyRegistry.register(
            FSDP2,
            FSDP2Strategy,
            description="FSDP2 (fully_shard) over every process, for vpd_lightning",
        )


register_strategies()
