"""Argument checks. Every public entry point validates its arguments here before any work starts,
and every error is a ValueError that names the value, the rule and the fix."""

from __future__ import annotations

import math

import torch

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")
TOPK_SOURCES = ("teacher", "student")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


def check_head_transform(prefix: str, scale: float, softcap: float | None) -> None:
    """A head's logit transform: `logit_scale` finite and > 0, softcapping None or finite > 0."""
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(
            f"{prefix}logit_scale must be a finite number > 0 (1.0: no scaling), got {scale}"
        )
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(
            f"{prefix}final_logit_softcapping must be None (no cap) or a finite number > 0, "
            f"got {softcap}"
        )


def check_tuning(block_v: int | None, chunk_size: int | None) -> None:
    """The optional tuning knobs: Triton vocabulary tile and rows per chunk."""
    if block_v is not None and (block_v < 1 or block_v & (block_v - 1)):
        raise ValueError(f"block_v must be a power of two >= 1, got {block_v}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def check_backward_dtype(dtype: torch.dtype | None) -> None:
    """The fused-linear backward's gradient-tile dtype: None (automatic) or a float dtype."""
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"backward_dtype must be None (the weight's dtype on CUDA, float32 elsewhere), "
            f"torch.float32 (exact), torch.bfloat16 or torch.float16, got {dtype!r}"
        )


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


def _check_ids(name: str, ids: torch.Tensor, token_shape, device, per_row: str = "one") -> None:
    """Dtype, device and leading shape of integer ids; `per_row` says how many a row takes."""
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of token ids (e.g. torch.long)")
    leading = ids.shape if per_row == "one" else ids.shape[:-1] if ids.dim() else None
    if leading != token_shape:
        raise ValueError(
            f"{name} has shape {tuple(ids.shape)} but there are {tuple(token_shape)} rows of logits; "
            f"pass {per_row} token id per row (the logits' shape without the vocabulary dimension"
            + (")" if per_row == "one" else ", then k)")
        )
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but the logits are on {device}; move it there")


def _out_of_range(ids: torch.Tensor, n_cols: int) -> torch.Tensor:
    return (ids < 0) | (ids >= n_cols)


def _range_error(name: str, ids: torch.Tensor, bad: torch.Tensor, n_cols: int, fix: str):
    example = int(ids[bad][0])
    return ValueError(
        f"{name} has {int(bad.sum())} ids outside [0, {n_cols}) (the vocabulary), for example "
        f"{example}; {fix}"
    )


def check_tokens(
    tokens: torch.Tensor, token_shape: torch.Size, device: torch.device, n_cols: int
) -> torch.Tensor:
    """Validate token ids of shape `token_shape` in [0, V) and return them flat as int64 (N,).

    The range check reads one flag back from the device (a host sync) on every backend.
    """
    _check_ids("tokens", tokens, token_shape, device)
    flat = tokens.reshape(-1).to(torch.int64).contiguous()
    bad = _out_of_range(flat, n_cols)
    if bool(bad.any()):
        raise _range_error("tokens", flat, bad, n_cols, "pass ids of the logits' vocabulary")
    return flat


def check_labels(
    labels: torch.Tensor,
    ignore_index: int | None,
    token_shape: torch.Size,
    device: torch.device,
    n_cols: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate labels (...) and return (ids, valid): int64 ids (N,) with ignored positions set
    to 0 (so that kernels may read them), and float32 weights (N,), 0 where label == ignore_index.

    Ids outside [0, V) other than `ignore_index` raise; the check is a host sync.
    """
    _check_ids("labels", labels, token_shape, device)
    flat = labels.reshape(-1).to(torch.int64)
    valid = flat != ignore_index if ignore_index is not None else torch.ones_like(flat, dtype=bool)
    bad = _out_of_range(flat, n_cols) & valid
    if bool(bad.any()):
        fix = (
            "pass ignore_index=<that id> to skip such positions (TRL and Liger use -100)"
            if ignore_index is None
            else f"only ignore_index={ignore_index} may lie outside"
        )
        raise _range_error("labels", flat, bad, n_cols, fix)
    return torch.where(valid, flat, 0).contiguous(), valid.to(torch.float32)


def check_topk(
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    token_shape: torch.Size,
    device: torch.device,
    n_cols: int,
    active: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the teacher's top-k ids and log-probs (..., k) and return them as (N, k) int64
    and float32. On rows with weight 0 (`active` False) the ids are replaced by 0..k-1, so padding
    may hold anything; elsewhere ids must be distinct and in [0, V) (checked with one host sync).
    """
    _check_ids("teacher_topk_ids", ids, token_shape, device, per_row="k")
    if not 1 <= ids.shape[-1] <= n_cols:
        raise ValueError(
            f"teacher_topk_ids has shape {tuple(ids.shape)}; pass (..., k) with the logits' "
            f"tokens {tuple(token_shape)} and 1 <= k <= V = {n_cols}"
        )
    check_floating("teacher_topk_logprobs", logprobs)
    if logprobs.shape != ids.shape or logprobs.device != device:
        raise ValueError(
            f"teacher_topk_logprobs has shape {tuple(logprobs.shape)} on {logprobs.device} but "
            f"teacher_topk_ids has {tuple(ids.shape)} on {device}; pass one log-prob per id"
        )
    k = ids.shape[-1]
    flat = ids.reshape(-1, k).to(torch.int64)
    flat = torch.where(active[:, None], flat, torch.arange(k, device=device)).contiguous()
    bad = _out_of_range(flat, n_cols)
    ordered = flat.sort(dim=-1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(-1)
    flags = torch.stack([bad.any(), repeated.any()]).tolist()  # one host sync for both checks
    if flags[0]:
        raise _range_error("teacher_topk_ids", flat, bad, n_cols, "pass ids of the vocabulary")
    if flags[1]:
        raise ValueError(
            f"teacher_topk_ids repeats an id in {int(repeated.sum())} rows; the k ids of a token "
            "must be distinct (as torch.topk gives them)"
        )
    return flat, logprobs.detach().reshape(-1, k).to(torch.float32).contiguous()


def check_bias(name: str, bias: torch.Tensor | None, weight_name: str, weight: torch.Tensor):
    """Raise unless `bias` is None or a (V,) tensor like the rows of `weight`."""
    if bias is None:
        return
    check_floating(name, bias)
    if bias.shape != weight.shape[:1] or bias.dtype != weight.dtype or bias.device != weight.device:
        raise ValueError(
            f"{name} has shape {tuple(bias.shape)}, {bias.dtype} on {bias.device}; pass "
            f"({weight.shape[0]},) in {weight_name}'s dtype {weight.dtype} on {weight.device}"
        )
