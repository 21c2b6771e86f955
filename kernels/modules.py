"""nn.Module wrappers that hold the loss keywords, for configs and model composition."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vpd_kernels.checks import LossSettings
from vpd_kernels.functional import distill_loss, fused_linear_distill_loss

_SETTINGS = ("divergence", "beta", "temperature", "ref_coef", "reduction")


def _validated(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Check the scalar keywords at construction so mistakes surface before training starts."""
    LossSettings(**{k: v for k, v in kwargs.items() if k in _SETTINGS})
    return dict(kwargs)


class DistillLoss(nn.Module):
    """`distill_loss` with its keywords fixed at construction (e.g. DistillLoss(divergence="jsd"))."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.kwargs = _validated(kwargs)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        ref_logits: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ):
        return distill_loss(
            student_logits, teacher_logits, ref_logits=ref_logits, mask=mask, **self.kwargs
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class FusedLinearDistillLoss(nn.Module):
    """`fused_linear_distill_loss` with its keywords fixed at construction."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.kwargs = _validated(kwargs)

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor | None = None,
        ref_hidden: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ):
        return fused_linear_distill_loss(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            mask=mask,
            **self.kwargs,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
