"""Data parallelism seen from the training step: sums over processes and the gradient scale.

Every process rolls out its own prompts; the batch a step learns from is all of them. DDP and FSDP2
average gradients over processes, so a loss normalised by global counts (tokens, successes,
failures, all summed over processes) is back-propagated times the world size on each process:
the average is then the global batch's gradient, and 2 processes on B prompts each train exactly
as one process on the same 2B prompts. Statistics (means, delta, the KL that adapts beta, the
logged metrics) are likewise sums over processes divided by global counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import Strategy


def sum_over_processes(strategy: Strategy, values: Sequence[float]) -> list[float]:
    """Each value summed over all processes (in float64); unchanged on one process."""
    tensor = torch.tensor(list(values), dtype=torch.float64, device=strategy.root_device)
    if strategy.world_size > 1:
        tensor = strategy.reduce(tensor, reduce_op="sum")
    return tensor.tolist()


def mean_over_processes(
    strategy: Strategy, means: dict[str, float], count: float
) -> dict[str, float]:
    """Global means from per-process means over `count` items each (counts may differ)."""
    keys = list(means)
    sums = sum_over_processes(strategy, [means[k] * count for k in keys] + [count])
    total = max(sums[-1], 1e-12)
    return {k: s / total for k, s in zip(keys, sums[:-1], strict=True)}


def gather_objects(obj: Any) -> list[Any]:
    """`obj` from every process, in rank order (a one-element list without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def end_process_group() -> None:
    """Destroys the default process group, once training has finished on every process. Without
    it gloo's worker threads outlive the interpreter and the process dies at exit with SIGABRT
    ("terminate called without an active exception") after a run that succeeded. Only for a run
    that ended normally: after an error the other processes may be inside a collective, and
    destroying the group then can hang."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
