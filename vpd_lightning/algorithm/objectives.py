"""The sequence-level objectives: BCO for the E-step and the GRPO surrogate.

Token-level divergences over the vocabulary live in `vpd_kernels`; these only see log-probs of the
sampled tokens, so they are plain PyTorch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def implicit_reward(
    teacher_logp: torch.Tensor, student_logp: torch.Tensor, beta: float
) -> torch.Tensor:
    """r~ = beta * (log q(y|x,C) - log sg pi_theta(y|x)): the dynamic prior is the current student."""
    return beta * (teacher_logp - student_logp.detach())


def bco_loss_terms(
    rewards: torch.Tensor,
    success: torch.Tensor,
    delta: torch.Tensor | float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence BCO losses, split by label: (sum over successes, sum over failures).

    The caller divides each sum by its (weighted) label count over the whole E-step buffer, so
    micro-batches accumulate to `-mean_succ log s(r~ - delta) - mean_fail log s(-(r~ - delta))`.
    Weight 0 drops a sequence (a rollout without teacher context) but keeps it in the graph.
    """
    margin = rewards - delta
    weights = torch.ones_like(margin) if weights is None else weights.to(margin.dtype)
    success = success.to(torch.bool)
    success_sum = -(F.logsigmoid(margin) * weights * success).sum()
    failure_sum = -(F.logsigmoid(-margin) * weights * ~success).sum()
    return success_sum, failure_sum


def ema_update(ema: float, batch_mean: float, momentum: float) -> float:
    """One step of BCO's running mean of the implicit reward: m ema + (1 - m) batch_mean."""
    return momentum * ema + (1.0 - momentum) * batch_mean


def bias_corrected(ema: float, updates: int, momentum: float) -> float:
    """ema / (1 - m^k) after k updates (0 before any): the first value is the first batch's mean,
    where an EMA started at 0 stays near 0 for ~1 / (1 - m) updates."""
    return ema / (1.0 - momentum**updates) if updates else 0.0


def adapt_beta(
    beta: float, measured_kl: float, target_kl: float, rate: float, low: float, high: float
) -> float:
    """Raise beta when the teacher drifts further than the target KL from the student, else lower."""
    if not math.isfinite(measured_kl):
        return beta
    factor = math.exp(rate) if measured_kl > target_kl else math.exp(-rate)
    return min(max(beta * factor, low), high)


def group_advantages(
    rewards: torch.Tensor, group_size: int, normalize_std: bool, eps: float = 1e-4
) -> torch.Tensor:
    """A_i = r_i - mean of its group, optionally / (its unbiased std + eps), as TRL's GRPOTrainer
    does by default (`scale_rewards="group"`); rewards are ordered group by group. A group whose
    rewards are all equal gets advantage 0 either way."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    return advantages.reshape(-1)


def grpo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> torch.Tensor:
    """Per-token PPO clipped surrogate (to minimise); advantages are already per token."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
    return -torch.minimum(unclipped, clipped)


def truncated_importance_weights(
    logp: torch.Tensor, sampler_logp: torch.Tensor, cap: float
) -> torch.Tensor:
    """min(pi_trainer / pi_sampler, cap) per token, without gradient: the truncated importance
    sampling (TIS) correction for tokens drawn by an engine whose probabilities differ from the
    trainer's (TRL's `vllm_importance_sampling_correction`, mode token_truncate; verl's TIS)."""
    return torch.exp(logp.detach() - sampler_logp).clamp(max=cap)
