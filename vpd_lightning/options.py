"""The trainer's option groups, each documented and checked where it is defined.

Every attribute's docstring is its one description: `python -m vpd_lightning fit --help` shows it
and the README's configuration reference is generated from it (`python -m vpd_lightning.reference`).
Checks that involve one group live in its `__post_init__`; checks across groups live in
`check_combinations`. Every choice that `../shared/vpd_method.md` marks as unconfirmed by the paper
is an option here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

from vpd_lightning.errors import UserInputError, require

Method = Literal["vpd", "sdpo", "opsd", "grpo"]
TeacherMode = Literal["shared", "adapter"]
SdpoTeacher = Literal["current", "ema", "interpolate"]
EStepPrior = Literal["student", "initial"]
Divergence = Literal["reverse_kl", "forward_kl", "jsd"]
TopkFrom = Literal["student", "teacher"]
RolloutEngineName = Literal["generate", "cached"]
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def require_choice(key: str, value: object, choices: type) -> None:
    """`value` must be one of the `Literal` type's values."""
    allowed = get_args(choices)
    require(value in allowed, key, value, f"must be one of {', '.join(map(str, allowed))}")


def require_positive_int(key: str, value: object) -> None:
    require(isinstance(value, int) and value >= 1, key, value, "must be an integer >= 1")


def require_finite(key: str, value: object, low: float, high: float, rule: str) -> None:
    """A finite number in [low, high] (the rule text says which ends are open)."""
    ok = isinstance(value, int | float) and math.isfinite(value) and low <= value <= high
    require(ok, key, value, rule)


@dataclass
class LoraOptions:
    """PEFT LoRA on the policy; `model.lora: null` means full fine-tuning."""

    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA input, in [0, 1)."""
    target_modules: str | list[str] = "all-linear"
    """Modules that get adapters: `all-linear` or a list of module names."""

    def __post_init__(self) -> None:
        require_positive_int("model.lora.r", self.r)
        require_finite("model.lora.alpha", self.alpha, 1e-12, math.inf, "must be > 0")
        require_finite("model.lora.dropout", self.dropout, 0.0, 1.0 - 1e-12, "must be in [0, 1)")
        require(
            bool(self.target_modules),
            "model.lora.target_modules",
            self.target_modules,
            "must be `all-linear` or a non-empty list of module names",
        )


@dataclass
class RolloutOptions:
    """Sampling of `num_generations` responses per prompt from the student."""

    num_generations: int = 4
    """Responses sampled per prompt (G); GRPO and `sibling` feedback need at least 2."""
    temperature: float = 1.0
    """Sampling temperature, >= 0 (0: greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    max_new_tokens: int = 256
    """Longest response, in tokens."""
    engine: RolloutEngineName = "generate"
    """What samples: `generate` (transformers' `generate`, the reference and fallback) or `cached`
    (`rollout/cached.py`: one prefill per prompt shared by its samples, finished rows dropped,
    LoRA merged for sampling; not under fsdp2). Same seed semantics, not the same draws."""

    def __post_init__(self) -> None:
        require_choice("model.rollout.engine", self.engine, RolloutEngineName)
        require_positive_int("model.rollout.num_generations", self.num_generations)
        require_finite("model.rollout.temperature", self.temperature, 0.0, math.inf, "must be >= 0")
        require_finite("model.rollout.top_p", self.top_p, 1e-12, 1.0, "must be in (0, 1]")
        require_positive_int("model.rollout.max_new_tokens", self.max_new_tokens)


@dataclass
class DistillOptions:
    """The M-step: a token-level divergence from the student to the stop-gradient teacher."""

    divergence: Divergence = "reverse_kl"
    """`reverse_kl` KL(student || teacher), `forward_kl` KL(teacher || student), or `jsd`."""
    jsd_beta: float = 0.5
    """Mixture weight of the generalised JSD, in (0, 1)."""
    temperature: float = 1.0
    """Softmax temperature of both distributions in the divergence, > 0 (its own option: GRPO's
    log-probs use the sampling temperature, `rollout.temperature`)."""
    trust_region_coef: float = 0.0
    """Weight of KL(student || rollout-time student); needs `updates_per_batch` > 1."""
    grpo_coef: float = 0.0
    """Weight of an added GRPO surrogate (a distillation + RL hybrid); 0: off."""
    topk: int | None = None
    """Distil on k tokens plus one bucket for the rest of each distribution; 0: the full
    vocabulary; null: the method's default (sdpo: 100, as SDPO's reference code; others: 0)."""
    topk_from: TopkFrom = "student"
    """Whose k most likely tokens: the `student`'s (SDPO's reference code) or the `teacher`'s."""

    def __post_init__(self) -> None:
        require_choice("model.distill.divergence", self.divergence, Divergence)
        require_finite(
            "model.distill.jsd_beta", self.jsd_beta, 1e-12, 1 - 1e-12, "must be in (0, 1)"
        )
        require_finite(
            "model.distill.temperature", self.temperature, 1e-12, math.inf, "must be > 0"
        )
        if self.topk is not None:
            require(
                isinstance(self.topk, int) and not isinstance(self.topk, bool) and self.topk >= 0,
                "model.distill.topk",
                self.topk,
                "must be an integer >= 0 (0: the full vocabulary) or null (the method's default)",
            )
        require_choice("model.distill.topk_from", self.topk_from, TopkFrom)
        for name in ("trust_region_coef", "grpo_coef"):
            require_finite(
                f"model.distill.{name}", getattr(self, name), 0.0, math.inf, "must be >= 0"
            )


@dataclass
class EStepOptions:
    """The E-step (VPD only): BCO on verifier labels, anchored to a prior policy."""

    every: int = 5
    """F: one E-step every F training steps, on the rollouts gathered since the last one."""
    prior: EStepPrior = "student"
    """The prior of the implicit reward: the current `student` (the dynamic prior) or the frozen
    `initial` student (the paper's ablation)."""
    beta: float = 0.1
    """Scale of the implicit reward beta * (log q - log prior), > 0."""
    delta_momentum: float = 0.9
    """Momentum of delta, BCO's running mean of the implicit reward, in [0, 1): a bias-corrected
    EMA that takes in each E-step's batch before its loss uses it."""
    length_normalize: bool = False
    """Divide sequence log-probs by the response length."""
    target_kl: float | None = None
    """Adapt beta toward this token-level KL(teacher || prior); null: beta stays fixed."""
    beta_rate: float = 0.1
    """Log-step of the beta adaptation, > 0."""
    beta_min: float = 1e-3
    """Lower bound of the adapted beta."""
    beta_max: float = 10.0
    """Upper bound of the adapted beta."""

    def __post_init__(self) -> None:
        key = "model.estep"
        require_positive_int(f"{key}.every", self.every)
        require_choice(f"{key}.prior", self.prior, EStepPrior)
        require_finite(f"{key}.beta", self.beta, 1e-12, math.inf, "must be > 0")
        require_finite(
            f"{key}.delta_momentum", self.delta_momentum, 0.0, 1 - 1e-12, "must be in [0, 1)"
        )
        if self.target_kl is not None:
            require_finite(
                f"{key}.target_kl", self.target_kl, 1e-12, math.inf, "must be > 0 or null"
            )
        require_finite(f"{key}.beta_rate", self.beta_rate, 1e-12, math.inf, "must be > 0")
        require_finite(f"{key}.beta_min", self.beta_min, 1e-12, math.inf, "must be > 0")
        require(
            self.beta_min <= self.beta <= self.beta_max,
            f"{key}.beta",
            self.beta,
            f"must lie in [beta_min, beta_max] = [{self.beta_min}, {self.beta_max}]",
        )


@dataclass
class SdpoOptions:
    """Which weights the passive teacher of SDPO uses."""

    teacher: SdpoTeacher = "ema"
    """`ema` of the student's weights (SDPO's reference default), the `current` weights, or
    `interpolate` initial and current logits."""
    ema_decay: float = 0.05
    """lambda of the EMA teacher: ema <- (1 - lambda) * ema + lambda * current, in (0, 1]."""
    interpolation: float = 0.5
    """a of the interpolated teacher: logits = a * initial + (1 - a) * current, in [0, 1]."""

    def __post_init__(self) -> None:
        require_choice("model.sdpo.teacher", self.teacher, SdpoTeacher)
        require_finite("model.sdpo.ema_decay", self.ema_decay, 1e-12, 1.0, "must be in (0, 1]")
        require_finite(
            "model.sdpo.interpolation", self.interpolation, 0.0, 1.0, "must be in [0, 1]"
        )


@dataclass
class GrpoOptions:
    """Group-relative policy gradient with a clipped surrogate (also the hybrid term)."""

    clip_low: float = 0.2
    """The ratio is clipped below at 1 - clip_low, in [0, 1)."""
    clip_high: float = 0.28
    """The ratio is clipped above at 1 + clip_high, >= 0."""
    normalize_std: bool = True
    """Divide each group's advantages by the group's unbiased reward standard deviation + 1e-4
    (TRL's default, `scale_rewards="group"`; false: Dr. GRPO's unscaled advantages)."""

    def __post_init__(self) -> None:
        require_finite("model.grpo.clip_low", self.clip_low, 0.0, 1 - 1e-12, "must be in [0, 1)")
        require_finite("model.grpo.clip_high", self.clip_high, 0.0, math.inf, "must be >= 0")


@dataclass
class ValidationOptions:
    """Held-out accuracy: mean@n and unbiased pass@k, optionally the teacher's too."""

    num_samples: int = 1
    """n: responses per held-out prompt."""
    pass_k: list[int] = field(default_factory=lambda: [1])
    """The k of each pass@k metric, each in [1, num_samples]."""
    temperature: float = 0.0
    """Sampling temperature, >= 0 (0: greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    max_new_tokens: int | None = None
    """Longest response, in tokens; null: the rollout's."""
    teacher: bool = False
    """Also measure `teacher_repair_rate`: of the student's wrong attempts, the fraction the
    teacher answers right when shown the verifier's feedback on that attempt (a context that never
    states the answer; refused for tasks whose feedback does)."""

    def __post_init__(self) -> None:
        key = "model.validation"
        require_positive_int(f"{key}.num_samples", self.num_samples)
        require(
            bool(self.pass_k)
            and all(isinstance(k, int) and 1 <= k <= self.num_samples for k in self.pass_k),
            f"{key}.pass_k",
            self.pass_k,
            f"must be a non-empty list of integers in [1, num_samples = {self.num_samples}]",
        )
        require_finite(f"{key}.temperature", self.temperature, 0.0, math.inf, "must be >= 0")
        require_finite(f"{key}.top_p", self.top_p, 1e-12, 1.0, "must be in (0, 1]")
        if self.max_new_tokens is not None:
            require_positive_int(f"{key}.max_new_tokens", self.max_new_tokens)


# What each method uses when an option is left null: SDPO's follow its reference code
# (lasgroup/SDPO: a successful sibling's solution and the environment's feedback, top-100 + tail).
DEFAULT_FEEDBACK_SOURCE = {
    "vpd": "verifier",
    "sdpo": "sibling_and_feedback",
    "opsd": "reference",
    "grpo": "verifier",
}
DEFAULT_TOPK = {"sdpo": 100}


def resolved_topk(method: str, distill: DistillOptions) -> int | None:
    """The top-k the M-step uses: `distill.topk`, or the method's default; None: full vocabulary."""
    k = distill.topk if distill.topk is not None else DEFAULT_TOPK.get(method, 0)
    return k or None


def as_options(cls: type, value: object) -> object:
    """An option group from its dataclass, a dict (a checkpoint's hparams) or None (defaults)."""
    if value is None:
        return cls()
    if isinstance(value, dict):
        return cls(**value)
    if not isinstance(value, cls):
        raise UserInputError(f"expected {cls.__name__} or a mapping, got {type(value).__name__}")
    return value


def check_combinations(
    *,
    method: str,
    teacher_mode: str,
    feedback_source: str,
    lora: LoraOptions | None,
    rollout: RolloutOptions,
    distill: DistillOptions,
    estep: EStepOptions,
    updates_per_batch: int,
    has_teacher_optimizer: bool,
    has_teacher_scheduler: bool,
) -> None:
    """Checks that involve more than one option group; the first violation is raised."""
    vpd_only = {
        "model.teacher_mode: adapter": teacher_mode == "adapter",
        "model.estep.prior: initial": estep.prior != "student",
        "model.teacher_optimizer": has_teacher_optimizer,
        "model.teacher_scheduler": has_teacher_scheduler,
    }
    for setting, given in vpd_only.items():
        if given and method != "vpd":
            raise UserInputError(
                f"{setting} is for model.method: vpd (the trained teacher), not {method}; remove it"
            )
    if teacher_mode == "adapter" and lora is None:
        raise UserInputError(
            "model.teacher_mode = 'adapter' needs LoRA: set model.lora (for example {r: 16})"
        )
    if method == "opsd" and feedback_source != "reference":
        raise UserInputError(
            f"model.feedback_source = {feedback_source!r}: method opsd shows the teacher the "
            "reference solution; set model.feedback_source: reference"
        )
    if method == "grpo" and distill.grpo_coef:
        raise UserInputError(
            f"model.distill.grpo_coef = {distill.grpo_coef}: it adds GRPO to vpd/sdpo/opsd; "
            "with method grpo leave it 0"
        )
    if (method == "grpo" or distill.grpo_coef) and rollout.num_generations < 2:
        raise UserInputError(
            f"model.rollout.num_generations = {rollout.num_generations}: GRPO's group-relative "
            "advantage needs at least 2"
        )
    if feedback_source.startswith("sibling") and rollout.num_generations < 2:
        raise UserInputError(
            f"model.rollout.num_generations = {rollout.num_generations}: feedback_source "
            f"{feedback_source} needs at least 2"
        )
    if distill.trust_region_coef and updates_per_batch == 1:
        raise UserInputError(
            f"model.distill.trust_region_coef = {distill.trust_region_coef} needs "
            "model.updates_per_batch > 1: with one update per batch the student is the "
            "rollout-time policy and the term is identically zero"
        )
