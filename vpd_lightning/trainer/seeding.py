"""Seeds derived from (seed, step, rank, ...) and every RNG's state for exact resumes."""

from __future__ import annotations

import random

import numpy as np
import torch

_MULTIPLIERS = (1_000_003, 7_919, 104_729, 15_485_863)


def mix_seed(seed: int, *parts: int) -> int:
    """A seed that is a pure function of `seed` and `parts` (step, rank, epoch, ...).

    Distinct inputs give distinct seeds for the ranges a run uses (parts below ~10^5 each).
    """
    if len(parts) > len(_MULTIPLIERS) - 1:
        raise ValueError(f"mix_seed takes at most {len(_MULTIPLIERS) - 1} parts, got {len(parts)}")
    value = seed * _MULTIPLIERS[0]
    for multiplier, part in zip(_MULTIPLIERS[1:], parts, strict=False):
        value += part * multiplier
    return value % (2**63)


def get_rng_state() -> dict:
    """Every RNG's state as tensors and plain values, so checkpoints load with weights_only."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
