"""Checks before a run loads anything costly: learning rates, and the checkpoint it starts from.

A checkpoint must be written by `VPDModule`: a file (one device, DDP) or a sharded folder (FSDP2:
one shard file per process plus `meta.pt`, which holds everything but the weights and optimizer
states). Resuming must not change what it was trained as: the model, the method and teacher mode, the LoRA shape, the dtype, the priors that
decide which snapshots it holds, and the optimizer classes. Everything else (max_steps, logging,
validation cadence, learning rates) may change on resume.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from vpd_lightning.algorithm.estep import EStep
from vpd_lightning.algorithm.methods import METHODS
from vpd_lightning.errors import UserInputError
from vpd_lightning.policy.snapshots import WeightSnapshot
from vpd_lightning.rollout.sampling import Rollout
from vpd_lightning.trainer.checkpoint_files import (
    SHARDED_METADATA,
    check_size,
    parameter_bytes,
    read_archive,
    read_dcp_metadata,
    size_budget,
    verify_folder,
)
from vpd_lightning.trainer.distributed import gather_objects
from vpd_lightning.trainer.seeding import get_rng_state
from vpd_lightning.trainer.stepping import NonFiniteGuard

DEFAULT_OPTIMIZER = "AdamW"
ROLES = ("student", "teacher")
# Settings that only some methods have (`MethodSpec.resume_keys` says which).
METHOD_SPECIFIC = {"model.estep.prior", "model.teacher_optimizer", "model.sdpo.teacher"}


def check_learning_rates(model_config: Any) -> None:
    """Each configured optimizer's `lr`, when given, is a finite number > 0."""
    for role in ROLES:
        optimizer = _get(model_config, f"{role}_optimizer")
        lr = _get(_get(optimizer, "init_args"), "lr")
        if lr is not None and not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
            raise UserInputError(
                f"model.{role}_optimizer.init_args.lr = {lr!r}: must be a number > 0"
            )


def load_checkpoint_file(path: str | Path) -> dict:
    """The checkpoint's contents (of a sharded folder: its `meta.pt`, without the weights), read
    without running or expanding anything (`checkpoint_files`), or a `UserInputError` that names
    the file and what is wrong. A folder's checksums and items are verified here, a file's
    checksum where its weights are loaded."""
    file = Path(path)
    if not file.exists():
        raise UserInputError(f"ckpt_path {path}: no such file")
    if file.is_dir():
        if not (file / SHARDED_METADATA).is_file():
            raise UserInputError(
                f"ckpt_path {path}: is a directory without {SHARDED_METADATA}, so not a sharded "
                "(fsdp2) checkpoint; give the .ckpt file in it"
            )
        verify_folder(file)
        file = file / SHARDED_METADATA
    checkpoint = read_archive(file, str(path))
    if not isinstance(checkpoint, dict) or "vpd_state" not in checkpoint:
        raise UserInputError(
            f"ckpt_path {path}: not written by vpd_lightning's VPDModule (no vpd_state); give "
            "a .ckpt file from a run's checkpoints/ folder"
        )
    return checkpoint


def check_checkpoint_fits(path: str | Path, module: torch.nn.Module) -> None:
    """The checkpoint holds at most `size_budget` of the built module, and exactly its weights,
    each of the module's shape; checked from the file's index (no weight is read)."""
    check_size(path, size_budget(parameter_bytes(module)))
    folder = Path(path)
    if folder.is_dir():
        metadata = read_dcp_metadata(folder).state_dict_metadata
        prefix = "state_dict."
        shapes = {
            k[len(prefix) :]: tuple(v.size) for k, v in metadata.items() if k.startswith(prefix)
        }
    else:
        shapes = {k: tuple(v.shape) for k, v in read_archive(folder)["state_dict"].items()}
    problem = weight_differences(
        {k: tuple(v.shape) for k, v in module.state_dict().items()}, shapes
    )
    if problem:
        raise UserInputError(f"ckpt_path {path}: {problem}; it was not written for this model")


def weight_differences(own: dict[str, tuple], theirs: dict[str, tuple]) -> str | None:
    """What differs between a model's weight shapes and a checkpoint's, or None."""
    missing, extra = sorted(own.keys() - theirs.keys()), sorted(theirs.keys() - own.keys())
    for problem, keys in (("lacks", missing), ("has unknown", extra)):
        if keys:
            more = " ..." if len(keys) > 3 else ""
            return f"{problem} weight(s) {', '.join(keys[:3])}{more} ({len(keys)} in all)"
    reshaped = sorted(k for k in own.keys() & theirs.keys() if own[k] != theirs[k])
    if reshaped:
        key = reshaped[0]
        return (
            f"weight {key} has shape {theirs[key]}, the model's is {own[key]} "
            f"({len(reshaped)} differ)"
        )
    return None


def trained_as(hparams: dict, optimizers: list[str]) -> dict[str, object]:
    """What a run was trained as, from a checkpoint's hparams and optimizer classes."""
    lora = hparams.get("lora") or {}
    return _applicable(
        hparams.get("method"),
        {
            "model.model": hparams.get("model"),
            "model.method": hparams.get("method"),
            "model.teacher_mode": hparams.get("teacher_mode"),
            "model.dtype": hparams.get("dtype"),
            "model.lora": "null" if not lora else "set",
            "model.lora.r": lora.get("r"),
            "model.lora.alpha": lora.get("alpha"),
            "model.lora.target_modules": _as_list(lora.get("target_modules")),
            "model.estep.prior": (hparams.get("estep") or {}).get("prior"),
            "model.sdpo.teacher": (hparams.get("sdpo") or {}).get("teacher"),
            "model.student_optimizer": optimizers[0] if optimizers else None,
            "model.teacher_optimizer": optimizers[1] if len(optimizers) > 1 else None,
        },
    )


def configured_as(model_config: Any) -> dict[str, object]:
    """The same keys as `trained_as`, from the (not yet instantiated) `model` config."""
    lora = _get(model_config, "lora")
    student = _optimizer_class(_get(model_config, "student_optimizer"))
    return _applicable(
        _get(model_config, "method"),
        {
            "model.model": _get(model_config, "model"),
            "model.method": _get(model_config, "method"),
            "model.teacher_mode": _get(model_config, "teacher_mode"),
            "model.dtype": _get(model_config, "dtype"),
            "model.lora": "null" if lora is None else "set",
            "model.lora.r": _get(lora, "r"),
            "model.lora.alpha": _get(lora, "alpha"),
            "model.lora.target_modules": _as_list(_get(lora, "target_modules")),
            "model.estep.prior": _get(_get(model_config, "estep"), "prior", "student"),
            "model.sdpo.teacher": _get(_get(model_config, "sdpo"), "teacher", "ema"),
            "model.student_optimizer": student,
            "model.teacher_optimizer": _optimizer_class(
                _get(model_config, "teacher_optimizer"), default=student
            ),
        },
    )


def _applicable(method: str | None, settings: dict[str, object]) -> dict[str, object]:
    """`settings` with the method-specific ones that do not apply to `method` set to None."""
    spec = METHODS.get(method)
    applies = set(spec.resume_keys()) if spec else set()
    return {k: v if k not in METHOD_SPECIFIC or k in applies else None for k, v in settings.items()}


def check_checkpoint(path: str | Path, model_config: Any) -> None:
    """The checkpoint is readable and was trained as the config says; else list what differs."""
    checkpoint = load_checkpoint_file(path)
    for key in ("global_step", "epoch"):
        value = checkpoint.get(key)
        if type(value) is not int or value < 0:
            raise UserInputError(
                f"ckpt_path {path}: {key} = {value!r}: must be a whole number >= 0 (a counter "
                "the trainer wrote); the checkpoint was edited or is broken"
            )
    before = trained_as(
        checkpoint.get("hyper_parameters", {}), checkpoint["vpd_state"].get("optimizers", [])
    )
    now = configured_as(model_config)
    differences = [
        f"{key}: {before[key]!r} -> {now[key]!r}"
        for key in before
        if None not in (before[key], now[key]) and before[key] != now[key]
    ]  # None: the setting does not apply to that method (then the method itself differs)
    if differences:
        raise UserInputError(
            f"ckpt_path {path}: the config changes what the checkpoint was trained as ("
            + "; ".join(differences)
            + "). Resume with the run's own config.yaml, changing only steps, logging, "
            "validation or learning rates"
        )


def _optimizer_class(config: Any, default: str = DEFAULT_OPTIMIZER) -> str:
    if config is None:
        return default
    class_path = _get(config, "class_path")
    if class_path is None:  # a callable given in Python, not a config
        return getattr(config, "__name__", default)
    return str(class_path).rsplit(".", 1)[-1]


def _as_list(value: object) -> object:
    return list(value) if isinstance(value, list | tuple) else value


def _get(config: Any, key: str, default: object = None) -> Any:
    """`config[key]` for a dict, a jsonargparse Namespace or a dataclass; `default` if absent."""
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(key, default)
    value = getattr(config, key, default)
    return default if value is None else value


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
