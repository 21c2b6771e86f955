"""Snapshots of trainable weights: the SDPO EMA teacher and the frozen initial policy.

A snapshot holds copies of the trainable parameters only (the LoRA weights under PEFT), and is
swapped into the live network for a no-grad teacher pass, so no second model is kept in memory.

Under FSDP2 the copies are shards (DTensors) like the parameters, and a module's registered
parameter is its shard between passes but the gathered full tensor inside its unit's forward.
So parameters are looked up by name at each use, and a shard is gathered when the live parameter
is: a swap reaches whichever tensor the next computation reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


class WeightSnapshot:
    """Detached float32 copies of named parameters of `module`, swappable into it. Float32
    whatever the parameters' dtype (bf16 under `precision: bf16-true`): an EMA step of
    decay * (current - value) below bf16's resolution would otherwise round away."""

    def __init__(self, module: torch.nn.Module, names: Iterable[str]) -> None:
        self.module = module
        self.names = list(names)
        self.values = {
            name: p.detach().to(torch.float32, copy=True) for name, p in self.params.items()
        }

    @property
    def params(self) -> dict[str, torch.nn.Parameter]:
        """The live parameters, looked up now (see the module docstring)."""
        return {name: self.module.get_parameter(name) for name in self.names}

    @torch.no_grad()
    def ema_update(self, decay: float) -> None:
        """values <- (1 - decay) * values + decay * current."""
        for name, p in self.params.items():
            self.values[name].lerp_(p.detach().float(), decay)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Run the network with the snapshot's values, then restore the live ones exactly."""
        params = self.params
        live = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(_as_live(self.values[name], p))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(live[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full tensors (shards are gathered: every process must call this)."""
        return {
            name: v.full_tensor() if isinstance(v, DTensor) else v
            for name, v in self.values.items()
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load full tensors (every process must call this: shards are scattered from rank 0)."""
        missing = set(self.values) - set(state)
        if missing:
            raise KeyError(f"snapshot misses {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        for name, value in state.items():
            target = self.values[name]
            if isinstance(target, DTensor):
                value = distribute_tensor(
                    value.to(target.device, target.dtype), target.device_mesh, target.placements
                )
            target.copy_(value)


def _as_live(value: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """`value` in the form of `live`: gathered when the live parameter is the full tensor."""
    if isinstance(value, DTensor) and not isinstance(live, DTensor):
        return value.full_tensor()
    return value
