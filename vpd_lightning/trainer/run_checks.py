"""Checks of a run's setup that Lightning or the model would find only later, or never.

Trainer flags that manual optimisation ignores or refuses, sequences that cannot fit the model's
positions (a 20k-token prompt on a 1024-position model would be accepted and take minutes per
step), `--ckpt_path last`, which Lightning resolves inside the new run's own (empty) folder, and
a true half precision, whose weights silently stop taking small updates.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from vpd_lightning.errors import UserInputError
from vpd_lightning.policy.models import TINY_ALIAS
from vpd_lightning.policy.tiny import MAX_POSITIONS as TINY_POSITIONS
from vpd_lightning.trainer.checkpoint import _get

LAST = "last.ckpt"
MANUAL_ONLY = {  # trainer flag: (the value that means off, the project's own option)
    "accumulate_grad_batches": (
        1,
        "model.micro_batch_size (sequences per forward/backward; a step already accumulates "
        "over its whole batch) or data.prompts_per_step",
    ),
    "gradient_clip_val": (None, "model.student_grad_clip and model.teacher_grad_clip"),
    "gradient_clip_algorithm": (None, "model.student_grad_clip and model.teacher_grad_clip"),
}
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def check_trainer_flags(trainer_config: Any) -> None:
    """Refuse flags that Lightning cannot apply to a module that steps its optimizers by hand."""
    for key, (off, instead) in MANUAL_ONLY.items():
        value = _get(trainer_config, key)
        if value is not None and value != off and not (key == "gradient_clip_val" and value == 0):
            raise UserInputError(
                f"trainer.{key} = {value!r}: this module steps its optimizers by hand (manual "
                f"optimization), which Lightning's {key} does not apply to; use {instead}"
            )


def model_positions(name: str) -> int | None:
    """The model's context length from its config alone (no weights); None if not known yet."""
    if name == TINY_ALIAS:
        return TINY_POSITIONS
    config = Path(name) / "config.json"
    if not config.is_file():
        return None
    try:
        return positions_of(json.loads(config.read_text(encoding="utf-8")))
    except (ValueError, UnicodeDecodeError):
        return None


def positions_of(config: Any) -> int | None:
    for key in POSITION_KEYS:
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_lengths_fit(positions: int | None, model_config: Any) -> None:
    """The longest responses and the teacher's context leave room for a prompt."""
    if positions is None:
        return
    context = _get(model_config, "max_context_tokens", 256)
    for key in ("rollout", "validation"):
        new = _get(_get(model_config, key), "max_new_tokens")
        if new is not None and new + context >= positions:
            raise UserInputError(
                f"model.{key}.max_new_tokens = {new}: with model.max_context_tokens = {context} "
                f"it leaves no room for a prompt in the model's {positions} positions; lower it "
                f"below {positions - context}"
            )


def check_prompts_fit(
    positions: int | None,
    lengths: dict[str, Sequence[int]],
    max_new_tokens: int,
    context_tokens: int,
) -> None:
    """Every prompt + the teacher's context + the longest response fits the model's positions."""
    if positions is None:
        return
    room = positions - max_new_tokens - context_tokens
    for split, sizes in lengths.items():
        over = [n for n in sizes if n > room]
        if over:
            raise UserInputError(
                f"data.task, split {split!r}: {len(over)} of {len(sizes)} prompts do not fit the "
                f"model's {positions} positions (longest {max(over)} tokens; at most {room} fit "
                f"beside model.rollout.max_new_tokens = {max_new_tokens} and "
                f"model.max_context_tokens = {context_tokens}); shorten or drop those prompts, or "
                "lower max_new_tokens"
            )


def resolve_last_checkpoint(trainer_config: Any) -> Path:
    """`--ckpt_path last`: the newest run's `last.ckpt` of this config's logger (or the
    ModelCheckpoint `dirpath` it sets), not the new run's empty folder."""
    for callback in _get(trainer_config, "callbacks") or []:
        dirpath = _get(_get(callback, "init_args"), "dirpath")
        if str(_get(callback, "class_path", "")).endswith("ModelCheckpoint") and dirpath:
            found = Path(dirpath) / LAST
            if found.is_file() or found.is_dir():
                return found
            raise UserInputError(f"ckpt_path last: no {found}; give the checkpoint's path")
    logger = _get(trainer_config, "logger")
    init = _get(logger, "init_args") or logger
    save_dir = _get(init, "save_dir") or _get(trainer_config, "default_root_dir") or "."
    name = _get(init, "name")
    root = Path(save_dir) / name if name else Path(save_dir)
    versions = [p for p in root.glob("version_*") if (p / "checkpoints" / LAST).exists()]
    versions.sort(key=lambda p: int(p.name[8:]) if p.name[8:].isdigit() else -1)
    if not versions:
        raise UserInputError(
            f"ckpt_path last: no {root}/version_*/checkpoints/{LAST} (the logger's runs); give "
            "the checkpoint's path"
        )
    return versions[-1] / "checkpoints" / LAST


HALF_MANTISSA_STEPS = {torch.bfloat16: 2**8, torch.float16: 2**11}
"""A weight w stored in this dtype ignores an update below about |w| / this (half its spacing)."""


def half_precision_update_warning(param_groups: Iterable[dict], precision: str) -> str | None:
    """What a true half precision (no float32 copy of the weights) rounds away, or None.

    An Adam-type step moves each weight by about its learning rate, so every trained weight larger
    than about lr x HALF_MANTISSA_STEPS in magnitude stops changing."""
    half, lrs = {}, []  # by id: teacher_mode shared gives two optimizers the same weights
    for group in param_groups:
        params = [p for p in group["params"] if p.requires_grad and p.dtype in HALF_MANTISSA_STEPS]
        if params:
            half.update((id(p), p) for p in params)
            lrs.append(float(group["lr"]))
    if not half:
        return None
    lr, dtype = min(lrs), next(iter(half.values())).dtype
    name = str(dtype).removeprefix("torch.")
    return (
        f"trainer.precision = {precision}: the optimizers' "
        f"{sum(p.numel() for p in half.values()):,} parameters are stored in "
        f"{name} with no float32 copy, so an update below about half a {name} step of its "
        f"weight rounds away; a step of lr = {lr:g} leaves every weight larger than about "
        f"{lr * HALF_MANTISSA_STEPS[dtype]:.2g} in magnitude unchanged. Use trainer.precision: "
        "bf16-mixed (float32 weights, bfloat16 compute)"
    )
