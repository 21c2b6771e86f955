"""TRL 1.16's distillation losses, same signatures and values, on vpd_kernels.

`chunked_divergence_loss` is `trl.trainer.distillation_trainer._chunked_divergence_loss`, the loss
of the stable `DistillationTrainer` (hidden states and heads in, loss / entropy sum / valid count
out); assign it over TRL's (kernels/README.md shows the lines). `generalized_jsd_loss` is GKD's:

    from trl.experimental.gkd import GKDTrainer
    from vpd_kernels.compat.trl import generalized_jsd_loss

    GKDTrainer.generalized_jsd_loss = staticmethod(generalized_jsd_loss)

Differences, all deliberate: the result is float32 whatever the logits' dtype (TRL's is the
logits' dtype, and its bf16 arithmetic is less accurate); `reduction="none"` returns one value
per token (TRL: one per vocabulary entry; sum TRL's over its last dimension to compare) in TRL's
layout otherwise: (n_valid,) with labels, (B, T) without; `beta` outside [0, 1] and
temperature <= 0 raise ValueError. The shifted `logits[:, :-1]` TRL passes are read in place.
"""

from __future__ import annotations

import math

import torch

from vpd_kernels.compat import divergence_of_beta
from vpd_kernels.functional import distill_loss, fused_linear_distill_loss


def chunked_divergence_loss(
    student_hidden_states: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    num_items_in_batch: torch.Tensor | int | None = None,
    student_lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    temperature: float = 1.0,
    *,
    backend: str = "auto",
    backward_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's generalised JSD (beta = 0 forward KL, 1 reverse KL) between the heads' distributions
    at `temperature`, after each model's logit scale and softcapping, over the positions where
    `completion_mask` (B, K) is not 0. Returns (loss, the sum of the student's entropies at T
    over those positions, their count): loss = sum / num_items_in_batch, or / max(count, 1)
    without it. Gradients reach the student's hidden states, head weight and bias.

    Unlike TRL's, the logits and gradients stay float32 from bf16 / fp16 inputs until the
    outputs (on CUDA the gradient tile is rounded to the weight's dtype for the backward GEMMs,
    as TRL's is; `backward_dtype` as in `fused_linear_distill_loss`), and sharded (DTensor)
    heads are not gathered here: pass plain tensors.
    """
    valid = completion_mask != 0
    loss, stats = fused_linear_distill_loss(
        student_hidden_states,
        student_lm_head_weight,
        teacher_hidden_states,
        teacher_lm_head_weight,
        student_bias=student_lm_head_bias,
        teacher_bias=teacher_lm_head_bias,
        logit_scale=student_logit_scale,
        final_logit_softcapping=student_final_logit_softcapping,
        teacher_logit_scale=teacher_logit_scale,
        teacher_final_logit_softcapping=teacher_final_logit_softcapping,
        temperature=temperature,
        mask=valid,
        reduction="sum",
        return_stats=True,
        backend=backend,
        backward_dtype=backward_dtype,
        **divergence_of_beta(beta),
    )
    n_valid = valid.sum()
    entropy_sum = torch.where(valid, stats.entropy, 0.0).sum()
    if num_items_in_batch is None:
        return loss / n_valid.clamp(min=1), entropy_sum, n_valid
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch, entropy_sum, n_valid


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch: int | torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Generalised JSD between softmax(student / T) and softmax(teacher / T) of shape (B, T, V),
    summed over the vocabulary; positions whose label is -100 are left out. beta = 0 is
    KL(teacher || student), beta = 1 KL(student || teacher). Reductions as TRL's: "batchmean"
    (sum / valid tokens, or / B without labels), "sum", "mean" (sum / (tokens * V)), anything
    else per token; with `num_items_in_batch`, sum / num_items_in_batch whatever the reduction.
    Gradients reach `student_logits`."""
    mask = labels != -100 if labels is not None else None
    per_token = num_items_in_batch is None and reduction not in ("batchmean", "sum", "mean")
    loss = distill_loss(
        student_logits,
        teacher_logits,
        temperature=temperature,
        mask=mask,
        reduction="none" if per_token else "sum",
        backend=backend,
        **divergence_of_beta(beta),
    )
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        return loss / num_items_in_batch
    if reduction == "batchmean":
        if mask is not None:
            return loss / mask.sum().clamp_min(1)
        return loss / max(student_logits.size(0), 1)
    if reduction == "sum":
        return loss
    if reduction == "mean":
        tokens = mask.sum() if mask is not None else math.prod(student_logits.shape[:-1])
        return loss / (tokens * student_logits.shape[-1])
    return loss[mask] if mask is not None else loss
