"""The run's own state in a checkpoint (`vpd_state`): written by every process, checked and
restored on resume. What a checkpoint may be and hold is checked in `run/checks.py`; how its files
are read, in `checkpoint_files.py`."""

from __future__ import annotations

from dataclasses import asdict

from vpd_lightning.algorithm.estep import EStep
from vpd_lightning.errors import UserInputError
from vpd_lightning.policy.snapshots import WeightSnapshot
from vpd_lightning.rollout.sampling import Rollout
from vpd_lightning.trainer.distributed import gather_objects
from vpd_lightning.trainer.seeding import get_rng_state
from vpd_lightning.trainer.stepping import NonFiniteGuard


def run_state(
    estep: EStep | None,
    guard: NonFiniteGuard,
    snapshot: WeightSnapshot | None,
    optimizers: list[str],
) -> dict:
    """The checkpoint's `vpd_state`. Runs on every process (process 0 writes): the E-step buffer
    and RNG states are each process's own and are kept per rank; the snapshot's shards are
    gathered under FSDP2."""
    buffer = [asdict(r) for r in estep.buffer] if estep is not None else []
    return {
        "per_rank": gather_objects({"estep_buffer": buffer, "rng": get_rng_state()}),
        "estep": estep.state_dict() if estep is not None else None,
        "nonfinite": guard.state_dict(),
        "snapshot": snapshot.state_dict() if snapshot is not None else None,
        "optimizers": optimizers,
    }


def own_state(state: dict | None, world: int, rank: int, fit: bool) -> dict:
    """This process's part of a checkpoint's `vpd_state`, after checking it can be resumed."""
    if state is None:
        raise UserInputError("this checkpoint was not written by VPDModule (no 'vpd_state')")
    if "per_rank" not in state or "estep" not in state:
        raise UserInputError(
            "ckpt_path: written by an older vpd_lightning (no per-process or E-step state); "
            "resume from a checkpoint of this version"
        )
    per_rank = state["per_rank"]
    if fit and len(per_rank) != world:
        raise UserInputError(
            f"ckpt_path: written by {len(per_rank)} process(es), resumed with {world}: each "
            "process's prompts and E-step buffer depend on the number of processes; resume "
            f"with trainer.devices x trainer.num_nodes = {len(per_rank)}"
        )
    return per_rank[min(rank, len(per_rank) - 1)]


def restore_run_state(
    state: dict,
    own: dict,
    estep: EStep | None,
    guard: NonFiniteGuard,
    snapshot: WeightSnapshot | None,
) -> dict:
    """Load `vpd_state` into the run's parts; returns the RNG state to restore at train start."""
    if estep is not None and state["estep"] is not None:
        estep.load_state_dict(state["estep"])
        estep.buffer = [Rollout(**r) for r in own["estep_buffer"]]
    guard.load_state_dict(state["nonfinite"])
    if snapshot is not None:
        snapshot.load_state_dict(state["snapshot"])
    return own["rng"]
