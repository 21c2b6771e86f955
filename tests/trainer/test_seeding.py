"""Seeds mixed from (seed, step, rank, ...) and RNG states that survive a checkpoint."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from vpd_lightning.trainer.seeding import get_rng_state, mix_seed, set_rng_state


def test_mixed_seeds_are_distinct_over_a_run_and_pure():
    seeds = {mix_seed(s, step, rank) for s in range(3) for step in range(500) for rank in range(8)}
    assert len(seeds) == 3 * 500 * 8
    assert mix_seed(7, 3, 1) == mix_seed(7, 3, 1)
    assert 0 <= mix_seed(2**62, 2**40, 5) < 2**63
    with pytest.raises(ValueError, match="at most 3 parts"):
        mix_seed(0, 1, 2, 3, 4)


def test_rng_state_restores_every_generator():
    state = get_rng_state()
    first = (torch.rand(2), random.random(), np.random.rand())
    set_rng_state(state)
    again = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]
