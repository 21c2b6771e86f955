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

from pathlib import Path

from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry

from vpd_lightning.errors import UserInputError

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


def check_checkpoint_strategy(ckpt_path: str | Path, strategy: object) -> None:
    """A sharded checkpoint (a folder) loads only under FSDP2; a checkpoint file loads under any
    strategy. `strategy` is the config's value: a name, a class_path config, or an instance."""
    if not Path(ckpt_path).is_dir():
        return
    name = strategy if isinstance(strategy, str) else getattr(strategy, "class_path", None)
    name = name or type(strategy).__name__
    if name == FSDP2 or name.endswith(("ModelParallelStrategy", "FSDP2Strategy")):
        return
    raise UserInputError(
        f"ckpt_path {ckpt_path}: a sharded (fsdp2) checkpoint folder, but trainer.strategy = "
        f"{name!r}; load it with --trainer.strategy {FSDP2}, or write it as a Hugging Face model "
        "with `python -m vpd_lightning export`"
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
