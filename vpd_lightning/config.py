"""Option groups of the trainer, as dataclasses so that jsonargparse builds them from YAML.

Every choice that `../shared/vpd_method.md` marks as unconfirmed by the paper is an option here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Method = Literal["vpd", "sdpo", "opsd", "grpo"]
TeacherMode = Literal["shared", "adapter"]
SdpoTeacher = Literal["current", "ema", "interpolate"]
EStepPrior = Literal["student", "initial"]
FeedbackSource = Literal["verifier", "sibling", "self_critique", "reference"]
Divergence = Literal["reverse_kl", "forward_kl", "jsd"]


@dataclass
class LoraOptions:
    """PEFT LoRA on the policy. `None` in the config means full fine-tuning."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"


@dataclass
class RolloutOptions:
    """Sampling of `num_generations` responses per prompt from the student."""

    num_generations: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256


@dataclass
class DistillOptions:
    """The M-step: token-level divergence from the student to the stop-gradient teacher."""

    divergence: Divergence = "reverse_kl"
    jsd_beta: float = 0.5
    temperature: float = 1.0
    # Trust region to the rollout-time policy; only meaningful with updates_per_batch > 1.
    trust_region_coef: float = 0.0
    # Adds the GRPO surrogate to the distillation loss (hybrid VPD/SDPO + RL).
    grpo_coef: float = 0.0


@dataclass
class EStepOptions:
    """The E-step (VPD only): BCO on verifier labels, anchored to a prior policy."""

    every: int = 5  # F: one E-step every F training steps
    # The prior the implicit reward is measured against: the current student (the dynamic prior,
    # VPD's trust region) or the frozen initial student (the paper's weaker ablation).
    prior: EStepPrior = "student"
    beta: float = 0.1
    delta_momentum: float = 0.9
    length_normalize: bool = False
    success_threshold: float = 1.0  # reward >= this counts as a success label
    # Adaptive beta toward a target token-level KL(q || pi_theta); off when target_kl is None.
    target_kl: float | None = None
    beta_rate: float = 0.1
    beta_min: float = 1e-3
    beta_max: float = 10.0


@dataclass
class SdpoOptions:
    """Which weights the passive teacher uses (SDPO)."""

    teacher: SdpoTeacher = "current"
    ema_decay: float = 0.05  # lambda: ema <- (1 - lambda) * ema + lambda * current
    interpolation: float = 0.5  # teacher logits = a * initial + (1 - a) * current


@dataclass
class GrpoOptions:
    """Group-relative policy gradient with a clipped surrogate (also the hybrid term)."""

    clip_low: float = 0.2
    clip_high: float = 0.28
    normalize_std: bool = False


@dataclass
class ValidationOptions:
    """Held-out accuracy: mean@n and unbiased pass@k, optionally the teacher's too."""

    num_samples: int = 1
    pass_k: list[int] = field(default_factory=lambda: [1])
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    max_new_tokens: int | None = None  # None: the rollout's
    teacher: bool = False
