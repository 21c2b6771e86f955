"""vpd_kernels: fused distillation losses (log-softmax + divergence + trust region) for PyTorch.

Depends on torch and (optionally, for the fast path) triton only. See README.md in this folder.
"""

from vpd_kernels.functional import (
    DistillStats,
    distill_loss,
    fused_linear_distill_loss,
    fused_linear_token_logprobs,
    token_logprobs,
    topk_distill_loss,
)
from vpd_kernels.modules import DistillLoss, FusedLinearDistillLoss

__all__ = [
    "DistillLoss",
    "DistillStats",
    "FusedLinearDistillLoss",
    "distill_loss",
    "fused_linear_distill_loss",
    "fused_linear_token_logprobs",
    "token_logprobs",
    "topk_distill_loss",
]
