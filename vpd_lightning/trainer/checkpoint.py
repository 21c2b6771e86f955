"""Checks before a run loads anything costly: learning rates, and the checkpoint it starts from.

A checkpoint must be written by `VPDModule`: a file (one device, DDP) or a sharded folder (FSDP2:
one shard file per process plus `meta.pt`, which holds everything but the weights and optimizer
states). Resuming must not change what it was trained as: the model, the method and teacher mode, the LoRA shape, the dtype, the priors that
decide which snapshots it holds, and the optimizer classes. Everything else (max_steps, logging,
validation cadence, learning rates) may change on resume.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from vpd_lightning.errors import UserInputError

DEFAULT_OPTIMIZER = "AdamW"
SHARDED_METADATA = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint
ROLES = ("student", "teacher")


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
    """The checkpoint's contents (of a sharded folder: its `meta.pt`, without the weights), or a
    `UserInputError` that names the file and what is wrong."""
    file = Path(path)
    if not file.exists():
        raise UserInputError(f"ckpt_path {path}: no such file")
    if file.is_dir():
        if not (file / SHARDED_METADATA).is_file():
            raise UserInputError(
                f"ckpt_path {path}: is a directory without {SHARDED_METADATA}, so not a sharded "
                "(fsdp2) checkpoint; give the .ckpt file in it"
            )
        file = file / SHARDED_METADATA
    if file.stat().st_size == 0:
        raise UserInputError(f"ckpt_path {path}: the file is empty (0 bytes), not a checkpoint")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        raise UserInputError(
            f"ckpt_path {path}: not a checkpoint of this trainer (torch.load cannot read it "
            "as one); give a .ckpt file from a run's checkpoints/ folder"
        ) from None
    if not isinstance(checkpoint, dict) or "vpd_state" not in checkpoint:
        raise UserInputError(
            f"ckpt_path {path}: not written by vpd_lightning's VPDModule (no vpd_state); give "
            "a .ckpt file from a run's checkpoints/ folder"
        )
    return checkpoint


def trained_as(hparams: dict, optimizers: list[str]) -> dict[str, object]:
    """What a run was trained as, from a checkpoint's hparams and optimizer classes."""
    lora = hparams.get("lora") or {}
    method = hparams.get("method")
    return {
        "model.model": hparams.get("model"),
        "model.method": method,
        "model.teacher_mode": hparams.get("teacher_mode"),
        "model.dtype": hparams.get("dtype"),
        "model.lora": "null" if not lora else "set",
        "model.lora.r": lora.get("r"),
        "model.lora.alpha": lora.get("alpha"),
        "model.lora.target_modules": _as_list(lora.get("target_modules")),
        "model.estep.prior": (hparams.get("estep") or {}).get("prior") if method == "vpd" else None,
        "model.sdpo.teacher": (hparams.get("sdpo") or {}).get("teacher")
        if method == "sdpo"
        else None,
        "model.student_optimizer": optimizers[0] if optimizers else None,
        "model.teacher_optimizer": optimizers[1] if len(optimizers) > 1 else None,
    }


def configured_as(model_config: Any) -> dict[str, object]:
    """The same keys as `trained_as`, from the (not yet instantiated) `model` config."""
    lora = _get(model_config, "lora")
    method = _get(model_config, "method")
    student = _optimizer_class(_get(model_config, "student_optimizer"))
    teacher = _optimizer_class(_get(model_config, "teacher_optimizer"), default=student)
    return {
        "model.model": _get(model_config, "model"),
        "model.method": method,
        "model.teacher_mode": _get(model_config, "teacher_mode"),
        "model.dtype": _get(model_config, "dtype"),
        "model.lora": "null" if lora is None else "set",
        "model.lora.r": _get(lora, "r"),
        "model.lora.alpha": _get(lora, "alpha"),
        "model.lora.target_modules": _as_list(_get(lora, "target_modules")),
        "model.estep.prior": _get(_get(model_config, "estep"), "prior", "student")
        if method == "vpd"
        else None,
        "model.sdpo.teacher": _get(_get(model_config, "sdpo"), "teacher", "current")
        if method == "sdpo"
        else None,
        "model.student_optimizer": student,
        "model.teacher_optimizer": teacher if method == "vpd" else None,
    }


def check_checkpoint(path: str | Path, model_config: Any) -> None:
    """The checkpoint is readable and was trained as the config says; else list what differs."""
    checkpoint = load_checkpoint_file(path)
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
