"""Liger-Kernel's `LigerFusedLinearJSDLoss` (liger_kernel.chunked_loss, 0.8.x), same constructor,
same forward, same loss and gradients, on vpd_kernels.

    from vpd_kernels.compat.liger import FusedLinearJSDLoss  # in place of LigerFusedLinearJSDLoss

loss = weight_soft_loss * soft + weight_hard_loss * hard, both means over the tokens whose label
is not `ignore_index`: soft is the generalised JSD at `temperature` (beta = 0 forward KL, 1
reverse KL), hard the cross-entropy of the student's logits (temperature 1) with the labels.
Both come from one pass over the vocabulary. Differences: `compiled` is accepted and ignored
(nothing to compile); `chunk_size` is the number of rows per chunk; a teacher vocabulary larger
than the student's (which Liger pads with zero logits) raises ValueError; labels outside
[0, V) other than `ignore_index` raise ValueError; soft and hard, with return_soft_hard_loss,
are detached float32 values.
"""

from __future__ import annotations

import torch

from vpd_kernels.checks import check_backward_dtype
from vpd_kernels.compat import divergence_of_beta
from vpd_kernels.functional import fused_linear_distill
from vpd_kernels.settings import LossSettings


class FusedLinearJSDLoss(torch.nn.Module):
    """Fused linear layer with the JSD distillation loss plus the hard cross-entropy."""

    def __init__(
        self,
        weight_hard_loss: float = 0.5,
        weight_soft_loss: float = 0.5,
        beta: float = 0.5,
        ignore_index: int = -100,
        temperature: float = 1.0,
        compiled: bool = True,
        chunk_size: int = 1024,
        return_soft_hard_loss: bool = False,
        *,
        backend: str = "auto",
        backward_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.settings = LossSettings.of(
            dict(
                temperature=temperature,
                ce_coef=weight_hard_loss,
                div_coef=weight_soft_loss,
                **divergence_of_beta(beta),
            )
        )
        check_backward_dtype(backward_dtype)
        self.backward_dtype = backward_dtype
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size
        self.return_soft_hard_loss = return_soft_hard_loss
        self.backend = backend

    def forward(
        self,
        student_input: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_input: torch.Tensor,
        teacher_weight: torch.Tensor,
        true_labels: torch.Tensor,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if teacher_weight.shape[0] != student_weight.shape[0]:
            raise ValueError(
                f"teacher_weight has {teacher_weight.shape[0]} vocabulary rows, student_weight "
                f"{student_weight.shape[0]}; Liger pads a smaller student vocabulary with zero "
                "logits, vpd_kernels needs the same vocabulary: slice the teacher's head"
            )
        outputs = fused_linear_distill(
            self.settings,
            student_input,
            student_weight,
            teacher_input,
            teacher_weight,
            ref_hidden=None,
            ref_weight=None,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            ref_bias=None,
            transforms=(1.0, None),
            teacher_transforms=(1.0, None),
            mask=None,
            labels=true_labels,
            ignore_index=self.ignore_index,
            backend=self.backend,
            return_stats=self.return_soft_hard_loss,
            chunk_size=self.chunk_size,
            block_v=None,
            backward_dtype=self.backward_dtype,
        )
        if not self.return_soft_hard_loss:
            return outputs
        loss, stats = outputs
        valid = (true_labels != self.ignore_index).reshape(stats.divergence.shape)
        tokens = valid.sum().clamp_min(1)
        soft = torch.where(valid, stats.divergence, 0.0).sum() / tokens
        hard = torch.where(valid, stats.cross_entropy, 0.0).sum() / tokens
        return loss, soft, hard
