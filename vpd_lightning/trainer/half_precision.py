"""The warning for a true half precision, whose weights silently stop taking small updates."""

from __future__ import annotations

from collections.abc import Iterable

import torch

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
