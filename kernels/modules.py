"""nn.Module forms of the losses: keywords fixed (and checked) at construction, tensors at call."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from vpd_kernels.checks import check_backward_dtype
from vpd_kernels.functional import distill_loss, fused_linear_distill_loss
from vpd_kernels.settings import LossSettings

_PER_CALL = {"ref_logits", "mask", "labels", "ref_hidden", "ref_weight"}
_PER_CALL |= {"student_bias", "teacher_bias", "ref_bias"}


def _validated(function, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Check the keywords at construction so that mistakes surface before training starts."""
    keywords = {
        name
        for name, p in inspect.signature(function).parameters.items()
        if p.kind is p.KEYWORD_ONLY and name not in _PER_CALL
    }
    unknown = sorted(set(kwargs) - keywords)
    if unknown:
        raise ValueError(
            f"unknown keywords {unknown} for {function.__name__}; it takes {sorted(keywords)} "
            f"(tensors such as {sorted(_PER_CALL & set(inspect.signature(function).parameters))} "
            "go to forward)"
        )
    LossSettings.of(kwargs)
    check_backward_dtype(kwargs.get("backward_dtype"))
    return dict(kwargs)


class DistillLoss(nn.Module):
    """`distill_loss` with its keywords fixed at construction (e.g. DistillLoss(divergence="jsd"))."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.kwargs = _validated(distill_loss, kwargs)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        *,
        ref_logits: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ):
        return distill_loss(
            student_logits,
            teacher_logits,
            ref_logits=ref_logits,
            mask=mask,
            labels=labels,
            **self.kwargs,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class FusedLinearDistillLoss(nn.Module):
    """`fused_linear_distill_loss` with its keywords fixed at construction."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.kwargs = _validated(fused_linear_distill_loss, kwargs)

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor | None = None,
        *,
        ref_hidden: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
    ):
        return fused_linear_distill_loss(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            mask=mask,
            labels=labels,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            ref_bias=ref_bias,
            **self.kwargs,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
