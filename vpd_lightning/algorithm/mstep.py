"""The M-step: the student update, and the loss of one micro-batch it accumulates.

The student is distilled toward the stop-gradient teacher that sees a context (vpd, sdpo, opsd),
optionally with GRPO's clipped surrogate added, or trained by GRPO alone. `mstep_loss` runs the
forward passes of one micro-batch and is tested without a Trainer against a float64 reference;
`student_update` is the loop over micro-batches and the step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

import vpd_kernels as vk
from vpd_lightning.algorithm.batches import MicroBatch, UpdateRunner, completion_tokens
from vpd_lightning.algorithm.objectives import (
    group_advantages,
    grpo_token_loss,
    truncated_importance_weights,
)
from vpd_lightning.options import DistillOptions, GrpoOptions
from vpd_lightning.policy.packing import PackedBatch
from vpd_lightning.policy.roles import Policy

Features = tuple[torch.Tensor, torch.Tensor]  # (hidden (T, H), head weight (V, H))


@dataclass
class MStepTerms:
    """What the student update optimises: distillation (None: off) and/or GRPO (coef 0: off).
    `distill` comes resolved by the method (`MethodSpec.resolved_distill`): top-k and whose ids."""

    distill: DistillOptions | None
    grpo_coef: float
    grpo: GrpoOptions
    sampling_temperature: float = 1.0
    """The temperature the rollouts were sampled at: GRPO's log-probs and ratios are those of the
    sampling distribution softmax(logits / T) (TRL's convention); 0 (greedy) counts as 1."""
    group_size: int = 1
    """Rollouts per prompt (consecutive in the batch): GRPO's groups."""


@dataclass
class MStepStats:
    """Token sums of one micro-batch; divide by the batch's token counts for means."""

    divergence: float = 0.0
    entropy: float = 0.0
    trust_region_kl: float = 0.0
    grpo: float = 0.0
    sampler_gap: float = 0.0

    def __add__(self, other: MStepStats) -> MStepStats:
        return MStepStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def mstep_loss(
    policy: Policy,
    student: PackedBatch,
    teacher: PackedBatch | None,
    *,
    terms: MStepTerms,
    has_context: torch.Tensor,
    advantages: torch.Tensor | None,
    anchor: Features | None,
    distill_tokens: int,
    all_tokens: int,
    sampler_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MStepStats]:
    """One micro-batch of the student update, run with the student's weights live.

    has_context: (B,) bool, sequences whose teacher saw a context (the others are not distilled).
    advantages: (B,) group-relative advantages, needed when `terms.grpo_coef` > 0.
    anchor: the rollout-time policy's features, for the trust region and GRPO's old log-probs
        (None with one update per batch: then the current policy is the rollout-time one).
    distill_tokens / all_tokens: the batch's distilled / total completion tokens (>= 1).
    sampler_logp: (T,) the sampling engine's own log-probs of the completion tokens (None: the
        engine samples from the trainer's weights themselves): their gap to the trainer's
        rollout-time log-probs is measured, and GRPO corrects for it (truncated importance weights).
    """
    stats = MStepStats()
    loss = torch.zeros((), device=student.targets.device, dtype=torch.float32)
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
    if terms.grpo_coef or sampler_logp is not None:
        hidden = policy.hidden(student) if hidden is None else hidden
        temperature = terms.sampling_temperature or 1.0
        with torch.set_grad_enabled(bool(terms.grpo_coef) and torch.is_grad_enabled()):
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
        if sampler_logp is not None:
            stats.sampler_gap = float((old_logp - sampler_logp).abs().sum())
    if terms.grpo_coef:
        if advantages is None:
            raise ValueError("GRPO needs the micro-batch's advantages")
        token_advantages = advantages.to(logp.device)[student.seq_index]
        g = terms.grpo
        token_loss = grpo_token_loss(logp, old_logp, token_advantages, g.clip_low, g.clip_high)
        if sampler_logp is not None and g.importance_sampling_cap is not None:
            token_loss = token_loss * truncated_importance_weights(
                old_logp, sampler_logp, g.importance_sampling_cap
            )
        grpo_sum = token_loss.sum()
        loss = loss + terms.grpo_coef * grpo_sum / all_tokens
        stats.grpo = float(grpo_sum.detach()) / all_tokens
    return loss, stats


@torch.no_grad()
def rollout_time_anchors(policy: Policy, batches: list[MicroBatch]) -> list[Features]:
    """Per micro-batch (hidden, head weight) of the policy as it sampled, kept for the updates
    after the first on the same rollouts: the trust-region anchor and GRPO's old log-probs."""

    def anchors(policy: Policy) -> list[Features]:
        weight = policy.kept_head_weight()
        with policy.student():
            return [(policy.hidden(b.student), weight) for b in batches]

    return policy.run(anchors)


def student_update(
    policy: Policy,
    batches: list[MicroBatch],
    terms: MStepTerms,
    runner: UpdateRunner,
    anchors: list[Features] | None = None,
    counted: bool = True,
) -> dict[str, float]:
    """One student update over a batch of rollouts: every process's micro-batches accumulate
    gradients, then one optimizer step. Returns the step's metrics over every process."""
    rollouts = [r for b in batches for r in b.rollouts]
    distill_sum, all_sum = runner.sum(
        [completion_tokens(rollouts, with_context_only=True), completion_tokens(rollouts)]
    )
    distill_tokens, all_tokens = max(int(distill_sum), 1), max(int(all_sum), 1)
    advantages = None
    if terms.grpo_coef:
        rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float32)
        advantages = group_advantages(rewards, terms.group_size, terms.grpo.normalize_std)

    local_loss, totals, start = 0.0, MStepStats(), 0
    with policy.student():
        for index, batch in enumerate(batches):
            end = start + len(batch.rollouts)
            loss, stats = policy.run(
                mstep_loss,
                batch.student,
                batch.teacher,
                terms=terms,
                has_context=batch.has_context,
                advantages=None if advantages is None else advantages[start:end],
                anchor=anchors[index] if anchors else None,
                distill_tokens=distill_tokens,
                all_tokens=all_tokens,
                sampler_logp=batch.sampler_logprobs,
            )
            runner.backward(loss)
            local_loss += float(loss.detach())
            totals += stats
            start = end
    names = list(asdict(totals))
    summed = runner.sum([local_loss, *(getattr(totals, n) for n in names)])
    totals = MStepStats(**dict(zip(names, summed[1:], strict=True)))

    out = {"mstep/loss": summed[0]}
    if terms.distill is not None:
        out["mstep/teacher_student_kl"] = totals.divergence / distill_tokens
        out["mstep/student_entropy"] = totals.entropy / distill_tokens
        if anchors and terms.distill.trust_region_coef:
            out["mstep/trust_region_kl"] = totals.trust_region_kl / distill_tokens
    if terms.grpo_coef:
        out["mstep/grpo_loss"] = totals.grpo
    if all(r.sampler_logprobs is not None for r in rollouts):
        out["rollout/sampler_logprob_gap"] = totals.sampler_gap / all_tokens
    grad_norm, skipped = runner.step("student", local_loss, counted)
    out["mstep/grad_norm"] = grad_norm
    out["mstep/skipped"] = float(skipped)
    if not skipped:
        policy.after_student_update()
    return out
