"""The M-step and E-step losses of one micro-batch, testable without a Trainer.

Each function runs the policy's forward passes for one micro-batch of packed sequences and returns
the loss to back-propagate plus detached statistics. Losses are normalised by counts over the
whole batch (passed in), so gradients accumulated over micro-batches equal the batch's gradient.
The sequence-level objectives themselves are the pure functions of `objectives.py`; the
vocabulary-wide divergences are `vpd_kernels`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import vpd_kernels as vk
from vpd_lightning.algorithm.objectives import bco_loss_terms, grpo_token_loss, implicit_reward
from vpd_lightning.options import DistillOptions, EStepOptions, GrpoOptions
from vpd_lightning.policy.packing import PackedBatch, per_sequence_sum
from vpd_lightning.policy.roles import Policy

Features = tuple[torch.Tensor, torch.Tensor]  # (hidden (T, H), head weight (V, H))


@dataclass
class MStepTerms:
    """What the student update optimises: distillation (None: off) and/or GRPO (coef 0: off)."""

    distill: DistillOptions | None
    grpo_coef: float
    grpo: GrpoOptions
    sampling_temperature: float = 1.0
    """The temperature the rollouts were sampled at: GRPO's log-probs and ratios are those of the
    sampling distribution softmax(logits / T) (TRL's convention); 0 (greedy) counts as 1."""


@dataclass
class MStepStats:
    """Token sums of one micro-batch; divide by the batch's token counts for means."""

    divergence: float = 0.0
    entropy: float = 0.0
    trust_region_kl: float = 0.0
    grpo: float = 0.0


def mstep_loss(
    policy: Policy,
    student: PackedBatch,
    teacher: PackedBatch,
    *,
    terms: MStepTerms,
    has_context: torch.Tensor,
    advantages: torch.Tensor | None,
    anchor: Features | None,
    distill_tokens: int,
    all_tokens: int,
) -> tuple[torch.Tensor, MStepStats]:
    """One micro-batch of the student update, run with the student's weights live.

    has_context: (B,) bool, sequences whose teacher saw a context (the others are not distilled).
    advantages: (B,) group-relative advantages, needed when `terms.grpo_coef` > 0.
    anchor: the rollout-time policy's features, for the trust region and GRPO's old log-probs
        (None with one update per batch: then the current policy is the rollout-time one).
    distill_tokens / all_tokens: the batch's distilled / total completion tokens (>= 1).
    """
    stats = MStepStats()
    loss = torch.zeros((), device=student.targets.device)
    hidden = None
    if terms.distill is not None:
        d = terms.distill
        t_hidden, t_weight = policy.teacher_features(teacher)
        hidden = policy.hidden(student)
        token_mask = has_context.to(hidden.device)[student.seq_index]
        trust_region = anchor is not None and d.trust_region_coef > 0
        distill_sum, token_stats = vk.fused_linear_distill_loss(
            hidden,
            policy.head_weight,
            t_hidden,
            t_weight,
            ref_hidden=anchor[0] if trust_region else None,
            ref_weight=anchor[1] if trust_region else None,
            ref_coef=d.trust_region_coef if trust_region else 0.0,
            divergence=d.divergence,
            beta=d.jsd_beta,
            temperature=d.temperature,
            teacher_topk=d.topk or None,
            topk_from=d.topk_from,
            mask=token_mask,
            reduction="sum",
            return_stats=True,
            **policy.distill_head_kwargs,
        )
        loss = loss + distill_sum / distill_tokens
        weights = token_mask.float()
        stats.divergence = float((token_stats.divergence * weights).sum())
        stats.entropy = float((token_stats.entropy * weights).sum())
        if trust_region:
            stats.trust_region_kl = float((token_stats.ref_kl * weights).sum())
    if terms.grpo_coef:
        if advantages is None:
            raise ValueError("GRPO needs the micro-batch's advantages")
        hidden = policy.hidden(student) if hidden is None else hidden
        temperature = terms.sampling_temperature or 1.0
        logp = vk.fused_linear_token_logprobs(
            hidden,
            policy.head_weight,
            student.targets,
            temperature=temperature,
            **policy.head_kwargs,
        )
        old_logp = logp.detach()
        if anchor is not None:
            with torch.no_grad():
                old_logp = vk.fused_linear_token_logprobs(
                    anchor[0],
                    anchor[1],
                    student.targets,
                    temperature=temperature,
                    **policy.head_kwargs,
                )
        token_advantages = advantages.to(logp.device)[student.seq_index]
        g = terms.grpo
        grpo_sum = grpo_token_loss(logp, old_logp, token_advantages, g.clip_low, g.clip_high).sum()
        loss = loss + terms.grpo_coef * grpo_sum / all_tokens
        stats.grpo = float(grpo_sum.detach()) / all_tokens
    return loss, stats


@dataclass
class EStepStats:
    """Per-sequence implicit rewards (detached) and the teacher-to-prior KL sum of a micro-batch."""

    rewards: torch.Tensor
    kl_sum: float = 0.0
    kl_tokens: int = 0


def implicit_rewards(
    policy: Policy,
    student: PackedBatch,
    teacher: PackedBatch,
    *,
    options: EStepOptions,
    beta: float,
    lengths: torch.Tensor,
    measure_kl: bool = False,
) -> tuple[torch.Tensor, float, int]:
    """r~ = beta (log q(y|x,C) - log sg prior(y|x)) per sequence, differentiable wrt the teacher;
    with `measure_kl`, also the token sum and count of KL(q || prior) (for the adaptive beta)."""
    s_hidden, s_weight = policy.prior_features(student)
    with torch.no_grad():
        s_logp = vk.fused_linear_token_logprobs(
            s_hidden, s_weight, student.targets, **policy.head_kwargs
        )
    kl_sum, kl_tokens = 0.0, 0
    with policy.trainable_teacher():
        t_hidden = policy.hidden(teacher)
        t_logp = vk.fused_linear_token_logprobs(
            t_hidden, policy.head_weight, teacher.targets, **policy.head_kwargs
        )
        if measure_kl:
            with torch.no_grad():  # KL(q || prior): forward KL seen from the prior
                kl_sum = float(
                    vk.fused_linear_distill_loss(
                        s_hidden,
                        s_weight,
                        t_hidden.detach(),
                        policy.head_weight.detach(),
                        divergence="forward_kl",
                        reduction="sum",
                        **policy.distill_head_kwargs,
                    )
                )
                kl_tokens = len(student.targets)
    s_seq = per_sequence_sum(s_logp, student)
    t_seq = per_sequence_sum(t_logp, teacher)
    if options.length_normalize:
        lengths = lengths.to(s_seq.device).clamp(min=1)
        s_seq, t_seq = s_seq / lengths, t_seq / lengths
    return implicit_reward(t_seq, s_seq, beta), kl_sum, kl_tokens


def estep_loss(
    policy: Policy,
    student: PackedBatch,
    teacher: PackedBatch,
    *,
    options: EStepOptions,
    beta: float,
    delta: torch.Tensor | float,
    success: torch.Tensor,
    weight: torch.Tensor,
    lengths: torch.Tensor,
    n_success: float,
    n_failure: float,
) -> tuple[torch.Tensor, EStepStats]:
    """One micro-batch of BCO on the teacher: successes up, failures down, relative to the prior.

    success / weight / lengths: (B,) labels, 0/1 weights (no context: 0), response lengths.
    n_success / n_failure: weighted label counts over the whole E-step buffer.
    """
    reward, kl_sum, kl_tokens = implicit_rewards(
        policy,
        student,
        teacher,
        options=options,
        beta=beta,
        lengths=lengths,
        measure_kl=options.target_kl is not None,
    )
    success_sum, failure_sum = bco_loss_terms(reward, success, delta, weight)
    loss = success_sum / max(n_success, 1.0) + failure_sum / max(n_failure, 1.0)
    return loss, EStepStats(reward.detach(), kl_sum, kl_tokens)
