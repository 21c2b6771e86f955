"""The E-step (VPD only): BCO on verifier labels trains the teacher, anchored to a prior.

`EStep` owns the E-step's state: BCO's running mean δ of the implicit reward, the trust-region
scale β (adapted toward `target_kl` when set), the buffer of rollouts since the last E-step and its
cadence (`every` steps). `estep_loss` is the loss of one micro-batch, tested without a Trainer
against a float64 reference. The update runs two passes over the buffer: a no-grad one that feeds
δ with this buffer's implicit rewards before the loss uses it (BCO's convention) and keeps the
prior's log-probs, and the loss pass, which reuses them: the prior runs once per E-step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import vpd_kernels as vk
from vpd_lightning.algorithm.batches import MicroBatch, UpdateRunner
from vpd_lightning.algorithm.objectives import (
    adapt_beta,
    bco_loss_terms,
    bias_corrected,
    ema_update,
    implicit_reward,
)
from vpd_lightning.options import EStepOptions
from vpd_lightning.policy.packing import PackedBatch, per_sequence_sum
from vpd_lightning.policy.roles import Policy
from vpd_lightning.rollout.sampling import Rollout


@dataclass
class PriorPass:
    """The no-grad pass over one micro-batch: what the loss pass and β's adaptation reuse."""

    prior_logp: torch.Tensor
    """(B,) log prior(y|x) per sequence (length-normalised if the option says so)."""
    rewards: torch.Tensor
    """(B,) implicit rewards beta (log q - log prior) before this E-step's update."""
    kl_sum: float = 0.0
    """Token sum of KL(q || prior), measured when β adapts."""
    kl_tokens: int = 0


def _sequence_logp(logp: torch.Tensor, batch: PackedBatch, lengths, normalize: bool):
    seq = per_sequence_sum(logp, batch)
    return seq / lengths.to(seq.device).clamp(min=1) if normalize else seq


@torch.no_grad()
def prior_pass(
    policy: Policy,
    student: PackedBatch,
    teacher: PackedBatch,
    *,
    options: EStepOptions,
    beta: float,
    lengths: torch.Tensor,
) -> PriorPass:
    """The prior's sequence log-probs and the implicit rewards of one micro-batch, without
    gradients; with `options.target_kl`, also the token sum of KL(q || prior)."""
    s_hidden, s_weight = policy.prior_features(student)
    s_logp = vk.fused_linear_token_logprobs(
        s_hidden, s_weight, student.targets, **policy.head_kwargs
    )
    with policy.trainable_teacher():
        t_hidden = policy.hidden(teacher)
    t_logp = vk.fused_linear_token_logprobs(
        t_hidden, policy.head_weight, teacher.targets, **policy.head_kwargs
    )
    normalize = options.length_normalize
    prior = _sequence_logp(s_logp, student, lengths, normalize)
    rewards = implicit_reward(_sequence_logp(t_logp, teacher, lengths, normalize), prior, beta)
    out = PriorPass(prior, rewards)
    if options.target_kl is not None:  # KL(q || prior): forward KL seen from the prior
        out.kl_sum = float(
            vk.fused_linear_distill_loss(
                s_hidden,
                s_weight,
                t_hidden,
                policy.head_weight.detach(),
                divergence="forward_kl",
                reduction="sum",
                **policy.distill_head_kwargs,
            )
        )
        out.kl_tokens = len(student.targets)
    return out


def estep_loss(
    policy: Policy,
    teacher: PackedBatch,
    *,
    prior_logp: torch.Tensor,
    options: EStepOptions,
    beta: float,
    delta: float,
    success: torch.Tensor,
    weight: torch.Tensor,
    lengths: torch.Tensor,
    n_success: float,
    n_failure: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch of BCO on the teacher: successes up, failures down, relative to the prior.

    prior_logp: (B,) the prior's sequence log-probs (`prior_pass`), a constant here.
    success / weight / lengths: (B,) labels, 0/1 weights (no context: 0), response lengths.
    n_success / n_failure: weighted label counts over the whole E-step buffer.
    Returns (loss, the detached implicit rewards).
    """
    with policy.trainable_teacher():
        t_logp = vk.fused_linear_token_logprobs(
            policy.hidden(teacher), policy.head_weight, teacher.targets, **policy.head_kwargs
        )
    t_seq = _sequence_logp(t_logp, teacher, lengths, options.length_normalize)
    reward = implicit_reward(t_seq, prior_logp, beta)
    success_sum, failure_sum = bco_loss_terms(reward, success, delta, weight)
    loss = success_sum / max(n_success, 1.0) + failure_sum / max(n_failure, 1.0)
    return loss, reward.detach()


class EStep:
    """The E-step's state and cadence, and the teacher update itself."""

    def __init__(self, options: EStepOptions, success_threshold: float) -> None:
        self.options = options
        self.success_threshold = success_threshold
        self.delta_ema = 0.0
        self.delta_updates = 0
        self.beta = options.beta
        self.buffer: list[Rollout] = []
        self.steps_since = 0

    @property
    def delta(self) -> float:
        """BCO's δ: the bias-corrected EMA of the E-steps' mean implicit rewards."""
        return bias_corrected(self.delta_ema, self.delta_updates, self.options.delta_momentum)

    def add(self, rollouts: list[Rollout]) -> bool:
        """Buffer one training step's rollouts; whether an E-step is due now (never with
        `every` 0, which buffers nothing)."""
        if not self.options.every:
            return False
        self.buffer.extend(rollouts)
        self.steps_since += 1
        return self.steps_since >= self.options.every

    def update(
        self, policy: Policy, batches: list[MicroBatch], runner: UpdateRunner
    ) -> dict[str, float]:
        """One teacher update on `batches` (the buffer, packed), then the buffer is emptied.

        The implicit reward is measured against the prior (by default the current student,
        detached: the dynamic prior). Label counts, δ and the KL that adapts β are over every
        process's buffer."""
        options, beta = self.options, self.beta
        rollouts = [r for b in batches for r in b.rollouts]
        weights = torch.tensor([float(r.has_context) for r in rollouts], dtype=torch.float32)
        success = torch.tensor([r.reward >= self.success_threshold for r in rollouts])
        n_success, n_failure = runner.sum(
            [float((weights * success).sum()), float((weights * ~success).sum())]
        )

        passes = [
            policy.run(
                prior_pass, b.student, b.teacher, options=options, beta=beta, lengths=b.lengths
            )
            for b in batches
        ]
        prior_rewards = torch.cat([p.rewards for p in passes]).cpu().double()
        total, count = runner.sum([float((prior_rewards * weights).sum()), float(weights.sum())])
        if count > 0 and math.isfinite(total):  # this buffer enters δ before its loss uses it
            self.delta_ema = ema_update(self.delta_ema, total / count, options.delta_momentum)
            self.delta_updates += 1
        delta = self.delta

        local_loss, rewards, start = 0.0, [], 0
        for batch, prior in zip(batches, passes, strict=True):
            end = start + len(batch.rollouts)
            device = batch.student.targets.device
            # Forward and backward in the teacher's context: gradient checkpointing recomputes
            # the forward during backward, and must do so with the teacher adapter active.
            with policy.trainable_teacher():
                loss, reward = policy.run(
                    estep_loss,
                    batch.teacher,
                    prior_logp=prior.prior_logp,
                    options=options,
                    beta=beta,
                    delta=delta,
                    success=success[start:end].to(device),
                    weight=weights[start:end].to(device),
                    lengths=batch.lengths,
                    n_success=n_success,
                    n_failure=n_failure,
                )
                runner.backward(loss)
            local_loss += float(loss.detach())
            rewards.append(reward)
            start = end

        reward = torch.cat(rewards).cpu().double()
        weights, success = weights.double(), success.double()
        kl_sum = sum(p.kl_sum for p in passes)
        kl_tokens = sum(p.kl_tokens for p in passes)
        sums = runner.sum(
            [
                local_loss,
                float((reward * weights).sum()),
                float(weights.sum()),
                float((reward * weights * success).sum()),
                float((weights * success).sum()),
                float((reward * weights * (1 - success)).sum()),
                float((weights * (1 - success)).sum()),
                kl_sum,
                kl_tokens,
            ]
        )
        loss_sum, reward_sum, weight_sum, s_reward, s_weight, f_reward, f_weight = sums[:7]
        kl_sum, kl_tokens = sums[7:]
        grad_norm, skipped = runner.step("teacher", local_loss, counted=False)
        self.buffer = []
        self.steps_since = 0

        out = {
            "estep/loss": loss_sum,
            "estep/grad_norm": grad_norm,
            "estep/skipped": float(skipped),
        }
        if weight_sum > 0:
            out["estep/implicit_reward"] = reward_sum / weight_sum
            if s_weight > 0 and f_weight > 0:
                out["estep/margin"] = s_reward / s_weight - f_reward / f_weight
        if kl_tokens:
            out["estep/teacher_kl"] = kl_sum / kl_tokens
            self.beta = adapt_beta(
                beta,
                kl_sum / kl_tokens,
                options.target_kl,
                options.beta_rate,
                options.beta_min,
                options.beta_max,
            )
        return out

    def state_dict(self) -> dict:
        """What a checkpoint keeps of it besides the buffer (which is each process's own)."""
        return {
            "delta_ema": self.delta_ema,
            "delta_updates": self.delta_updates,
            "beta": self.beta,
            "steps_since": self.steps_since,
        }

    def load_state_dict(self, state: dict) -> None:
        self.delta_ema = float(state["delta_ema"])
        self.delta_updates = int(state["delta_updates"])
        self.beta = float(state["beta"])
        self.steps_since = int(state["steps_since"])
