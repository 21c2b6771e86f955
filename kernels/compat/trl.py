"""TRL's `GKDTrainer.generalized_jsd_loss` (TRL 1.16), same signature and values, on vpd_kernels.

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
from vpd_kernels.functional import distill_loss


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
