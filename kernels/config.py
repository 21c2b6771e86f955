"""Loss configuration, per-token outputs and input validation shared by every backend."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class DistillConfig:
    """The scalar settings of a distillation loss, validated once so kernels can trust them."""

    divergence: str = "reverse_kl"
    beta: float = 0.5
    temperature: float = 1.0
    ref_coef: float = 0.0
    reduction: str = "mean"

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.divergence == "jsd" and not 0.0 < float(self.beta) < 1.0:
            raise ValueError(
                f"beta must lie strictly inside (0, 1) for divergence='jsd', got {self.beta}; "
                "use divergence='forward_kl' or 'reverse_kl' for the end points"
            )
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if not (math.isfinite(self.ref_coef) and self.ref_coef >= 0):
            raise ValueError(f"ref_coef must be a finite number >= 0, got {self.ref_coef}")


class DistillStats(NamedTuple):
    """Detached per-token float32 statistics, shape (...) like the loss with reduction="none".

    They are not weighted by the mask: apply it yourself when averaging for logs.
    """

    divergence: (
        torch.Tensor
    )  # the chosen divergence between softmax(student/T) and softmax(teacher/T)
    ref_kl: (
        torch.Tensor | None
    )  # KL(softmax(student) || softmax(ref)) at T=1; None without ref_logits
    entropy: torch.Tensor  # entropy of softmax(student/T)


def finish_outputs(
    loss: torch.Tensor,
    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    token_shape: torch.Size,
    reduction: str,
    has_ref: bool,
    return_stats: bool,
) -> torch.Tensor | tuple[torch.Tensor, DistillStats]:
    """Shape the loss like the tokens for reduction="none" and attach the per-token statistics."""
    if reduction == "none":
        loss = loss.view(token_shape)
    if not return_stats:
        return loss
    divergence, ref_kl, entropy = rows
    stats = DistillStats(
        divergence.view(token_shape),
        ref_kl.view(token_shape) if has_ref else None,
        entropy.view(token_shape),
    )
    return loss, stats


class RowOutputs(NamedTuple):
    """What a backend returns for a (N, V) block of rows: unweighted per-row float32 values."""

    loss: torch.Tensor  # divergence + ref_coef * ref_kl
    divergence: torch.Tensor
    ref_kl: torch.Tensor  # zeros when there is no reference
    entropy: torch.Tensor


def check_floating(name: str, tensor: torch.Tensor) -> None:
    """Raise unless `tensor` has a dtype the kernels compute with (fp32, bf16, fp16)."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} has dtype {tensor.dtype}; pass float32, bfloat16 or float16 (e.g. {name}.float())"
        )
    if tensor.dim() < 1 or tensor.shape[-1] < 1:
        raise ValueError(
            f"{name} needs a last (vocabulary or hidden) dimension >= 1, got {tuple(tensor.shape)}"
        )


def check_like(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Raise unless `tensor` is a float tensor with the same shape and device as `ref`."""
    check_floating(name, tensor)
    if tensor.shape != ref.shape:
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)} but {ref_name} has {tuple(ref.shape)}; "
            "they must match (same tokens, same vocabulary size)"
        )
    if tensor.device != ref.device:
        raise ValueError(
            f"{name} is on {tensor.device} but {ref_name} is on {ref.device}; move them together"
        )


def mask_weights(
    mask: torch.Tensor | None, token_shape: torch.Size, device: torch.device
) -> torch.Tensor:
    """Turn a bool/float mask of shape `token_shape` (or None) into flat float32 weights (N,)."""
    n = math.prod(token_shape)
    if mask is None:
        return torch.ones(n, device=device, dtype=torch.float32)
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a bool or float tensor, got {type(mask).__name__}")
    if mask.shape != token_shape:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but the logits have {tuple(token_shape)} tokens; "
            "pass one weight per token (the logits' shape without the vocabulary dimension)"
        )
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise ValueError(f"mask has dtype {mask.dtype}; pass a bool mask or float weights")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but the logits are on {device}; move it there")
    return mask.reshape(n).to(torch.float32)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Pick "triton" or "torch" for tensors on `device`; explain how to fix impossible requests."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise ValueError(
            "backend='triton' needs the triton package; install it or use backend='torch'"
        )
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    raise ValueError(
        f"backend='triton' got tensors on {device}: move them to a CUDA device, use backend='torch', "
        "or (CPU only, slow) set TRITON_INTERPRET=1 in the environment before triton is imported"
    )


def triton_available() -> bool:
    """Whether triton can be imported (it is absent on macOS and Windows)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def check_tokens(
    tokens: torch.Tensor, token_shape: torch.Size, device: torch.device
) -> torch.Tensor:
    """Validate token ids of shape `token_shape` and return them flat as int64 (N,).

    Ids must lie in [0, V); the range is not checked on the Triton path to avoid a host sync.
    """
    if (
        not isinstance(tokens, torch.Tensor)
        or tokens.dtype.is_floating_point
        or tokens.dtype == torch.bool
    ):
        raise ValueError("tokens must be an integer tensor of token ids (e.g. torch.long)")
    if tokens.shape != token_shape:
        raise ValueError(
            f"tokens has shape {tuple(tokens.shape)} but there are {tuple(token_shape)} rows of logits; "
            "pass one token id per row (the logits' shape without the vocabulary dimension)"
        )
    if tokens.device != device:
        raise ValueError(
            f"tokens is on {tokens.device} but the logits are on {device}; move it there"
        )
    return tokens.reshape(-1).to(torch.int64).contiguous()
