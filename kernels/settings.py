"""The scalar settings of a distillation loss: one frozen value, built from the public keywords
by `LossSettings.of` alone (functions, modules and compat wrappers all call it) and validated
once (with checks.py), that every layer below reads."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vpd_kernels.checks import DIVERGENCES, REDUCTIONS, TOPK_SOURCES, check_temperature

# Public keywords whose setting has another name: `topk_tail` (distill_loss) and `tail`
# (topk_distill_loss) are both the top-k's tail bucket.
_RENAMED = {"topk_tail": "tail"}


@dataclass(frozen=True)
class LossSettings:
    """The scalar settings of a distillation loss, validated once so that kernels can trust them.

    Per token: loss = div_coef * D + ref_coef * KL(student || ref) + ce_coef * CE(labels), where
    D is the divergence at `temperature`, over the full vocabulary or, with `teacher_topk` (the k
    most likely tokens of the teacher, or of the student with `topk_from="student"`, as SDPO's
    reference does) or given top-k teacher log-probs, over k buckets plus, with `tail`, one for
    the rest. `div_coef` is not a public keyword: the Liger compatibility layer sets it.
    """

    divergence: str = "reverse_kl"
    beta: float = 0.5
    temperature: float = 1.0
    ref_coef: float = 0.0
    reduction: str = "mean"
    ce_coef: float = 0.0
    div_coef: float = 1.0
    teacher_topk: int | None = None
    tail: bool = True
    topk_from: str = "teacher"

    @classmethod
    def of(cls, keywords: Mapping[str, Any]) -> LossSettings:
        """The settings among a public function's keywords (others, such as tensors, ignored).

        The public functions call it first thing with `locals()`, so that a keyword is named once,
        in its signature."""
        names = {f.name for f in dataclasses.fields(cls)}
        renamed = {_RENAMED.get(k, k): v for k, v in keywords.items()}
        return cls(**{k: v for k, v in renamed.items() if k in names})

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.divergence == "jsd" and not 0.0 < float(self.beta) < 1.0:
            raise ValueError(
                f"beta must lie strictly inside (0, 1) for divergence='jsd', got {self.beta}; "
                "use divergence='forward_kl' or 'reverse_kl' for the end points (TRL's and "
                "Liger's beta=0 is forward_kl, beta=1 reverse_kl; vpd_kernels.compat maps them)"
            )
        check_temperature(self.temperature)
        for name in ("ref_coef", "ce_coef", "div_coef"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        k = self.teacher_topk
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"teacher_topk must be None or an integer >= 1, got {k!r}")
        if self.topk_from not in TOPK_SOURCES:
            raise ValueError(
                f"topk_from must be one of {TOPK_SOURCES} (whose k most likely tokens the "
                f"top-k divergence is taken over), got {self.topk_from!r}"
            )
