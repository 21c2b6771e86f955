"""Snapshots of trainable weights: the SDPO EMA teacher and the frozen initial policy.

A snapshot holds copies of the trainable parameters only (the LoRA weights under PEFT), and is
swapped into the live network for a no-grad teacher pass, so no second model is kept in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class WeightSnapshot:
    """Detached copies of named parameters, swappable into the network they came from."""

    def __init__(self, named_params: dict[str, torch.nn.Parameter]) -> None:
        self.params = named_params
        self.values = {name: p.detach().clone() for name, p in named_params.items()}

    @torch.no_grad()
    def ema_update(self, decay: float) -> None:
        """values <- (1 - decay) * values + decay * current."""
        for name, p in self.params.items():
            self.values[name].lerp_(p.detach(), decay)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Run the network with the snapshot's values, then restore the live ones exactly."""
        live = {name: p.detach().clone() for name, p in self.params.items()}
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.values[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(live[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.values)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.values) - set(state)
        if missing:
            raise KeyError(f"snapshot misses {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        for name, value in state.items():
            self.values[name].copy_(value)
