"""Argument checks. Every public entry point validates its arguments here before any work starts,
and every error is a ValueError that names the value, the rule and the fix."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class LossSettings:
    """The scalar settings of a distillation loss, validated once so that kernels can trust them."""

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
        check_temperature(self.temperature)
        if not (math.isfinite(self.ref_coef) and self.ref_coef >= 0):
            raise ValueError(f"ref_coef must be a finite number >= 0, got {self.ref_coef}")


def check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


def check_tuning(block_v: int | None, chunk_size: int | None) -> None:
    """The optional tuning knobs: Triton vocabulary tile and rows per chunk."""
    if block_v is not None and (block_v < 1 or block_v & (block_v - 1)):
        raise ValueError(f"block_v must be a power of two >= 1, got {block_v}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


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


def check_linear(
    hidden_name: str, hidden: torch.Tensor, weight_name: str, weight: torch.Tensor
) -> None:
    """Raise unless hidden (..., H) and weight (V, H) can make logits together."""
    check_floating(hidden_name, hidden)
    check_floating(weight_name, weight)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{weight_name} must have shape (V, H) with H = {hidden_name}.shape[-1] = {hidden.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(
            f"{hidden_name} is {hidden.dtype} but {weight_name} is {weight.dtype}; cast one so they match"
        )
    if weight.device != hidden.device:
        raise ValueError(
            f"{hidden_name} is on {hidden.device} but {weight_name} is on {weight.device}"
        )


def check_same_tokens(
    name: str, hidden: torch.Tensor, weight: torch.Tensor, student_hidden, student_weight
) -> None:
    """Raise unless a teacher/ref pair has the student's tokens, vocabulary and device."""
    token_shape = student_hidden.shape[:-1]
    if hidden.shape[:-1] != token_shape or weight.shape[0] != student_weight.shape[0]:
        raise ValueError(
            f"{name}_hidden has {tuple(hidden.shape[:-1])} tokens and {name}_weight {weight.shape[0]} "
            f"vocabulary rows, but the student has {tuple(token_shape)} and {student_weight.shape[0]}; "
            "they must match"
        )
    if hidden.device != student_hidden.device:
        raise ValueError(
            f"{name}_hidden is on {hidden.device} but student_hidden is on {student_hidden.device}"
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
