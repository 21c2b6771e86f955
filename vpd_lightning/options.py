"""The trainer's option groups, each documented and checked where it is defined.

Every attribute's docstring is its one description: `python -m vpd_lightning fit --help` shows it
and the README's configuration reference is generated from it (`python -m vpd_lightning.reference`).
Checks that involve one group live in its `__post_init__`; checks across groups, which depend on
the method, live with the method table (`algorithm/methods.py`). Values derived from a group live
on it (`RolloutOptions.sampling`). Every choice that `../shared/vpd_method.md` marks as unconfirmed by the paper
is an option here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

from vpd_lightning.errors import (
    UserInputError,
    require,
    require_choice,
    require_finite,
    require_int,
)

Method = Literal["vpd", "sdpo", "opsd", "grpo"]
TeacherMode = Literal["shared", "adapter"]
SdpoTeacher = Literal["current", "ema", "interpolate"]
EStepPrior = Literal["student", "initial"]
Divergence = Literal["reverse_kl", "forward_kl", "jsd"]
TopkFrom = Literal["student", "teacher"]
RolloutEngineName = Literal["generate", "cached", "vllm"]
DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass
class SamplingParams:
    """What a rollout engine is asked for: the shape a vLLM-style engine takes."""

    num_samples: int = 1
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None  # sampling is a pure function of the seed, which makes resume exact


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
        require_int("model.lora.r", self.r)
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
    LoRA merged for sampling; not under fsdp2) or `vllm` (`rollout/vllm_engine.py`: vLLM in each
    process on a pushed copy of the weights, checked after every push; `make install-vllm`; not
    under fsdp2). Same seed semantics, not the same draws. Validation, `predict` and the teacher's
    repair probe sample with the same engine."""
    sampler_dtype: str | None = None
    """`vllm` only: the engine's dtype (`float32`, `bfloat16`, `float16`); null: the weights'.
    bf16 sampling from float32 training is what TRL and verl do on GPUs; GRPO then corrects for
    the gap (`grpo.importance_sampling_cap`)."""

    def __post_init__(self) -> None:
        require_choice("model.rollout.engine", self.engine, RolloutEngineName)
        if self.sampler_dtype is not None:
            require(
                self.sampler_dtype in DTYPE_NAMES,
                "model.rollout.sampler_dtype",
                self.sampler_dtype,
                f"must be one of {', '.join(DTYPE_NAMES)} or null (the weights' dtype)",
            )
            require(
                self.engine == "vllm",
                "model.rollout.sampler_dtype",
                self.sampler_dtype,
                "applies to model.rollout.engine: vllm only; set it to null or use that engine",
            )
        require_int("model.rollout.num_generations", self.num_generations)
        require_finite("model.rollout.temperature", self.temperature, 0.0, math.inf, "must be >= 0")
        require_finite("model.rollout.top_p", self.top_p, 1e-12, 1.0, "must be in (0, 1]")
        require_int("model.rollout.max_new_tokens", self.max_new_tokens)

    def sampling(self, seed: int) -> SamplingParams:
        """The training rollouts' sampling parameters, seeded."""
        return SamplingParams(
            self.num_generations, self.temperature, self.top_p, self.max_new_tokens, seed
        )


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
    topk_from: TopkFrom | None = None
    """Whose k most likely tokens: the `student`'s or the `teacher`'s; null: the method's default
    (sdpo: student, as SDPO's reference code; others: teacher, as `vpd_kernels`' own default)."""

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
        if self.topk_from is not None:
            require_choice("model.distill.topk_from", self.topk_from, TopkFrom)
        for name in ("trust_region_coef", "grpo_coef"):
            require_finite(
                f"model.distill.{name}", getattr(self, name), 0.0, math.inf, "must be >= 0"
            )


@dataclass
class EStepOptions:
    """The E-step (VPD only): BCO on verifier labels, anchored to a prior policy."""

    every: int = 5
    """F: one E-step every F training steps, on the rollouts gathered since the last one; 0: never
    (VPD without its E-step: the same contexts, divergence and teacher, a passive teacher)."""
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
        require(
            isinstance(self.every, int) and not isinstance(self.every, bool) and self.every >= 0,
            f"{key}.every",
            self.every,
            "must be an integer >= 0 (0: no E-step)",
        )
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
    interpolation: float = 0.95
    """a of the interpolated teacher: logits = a * initial + (1 - a) * current, in [0, 1]. 0.95
    is SDPO's trust-region teacher: `torch.lerp(ref, student, teacher_update_rate)` with rate 0.05
    (lasgroup/SDPO verl/workers/actor/dp_actor.py:51-64, actor.yaml:105)."""

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
    (TRL's default, `scale_rewards="group"`); false: unscaled advantages, the GRPO baseline of
    SDPO's and the VPD paper's runs (lasgroup/SDPO verl/trainer/config/baseline_grpo.yaml:20,
    `norm_adv_by_std_in_grpo: False`)."""
    importance_sampling_cap: float | None = 3.0
    """With an engine that reports its own log-probs (`vllm`): weight each token's GRPO loss by
    min(pi_trainer / pi_sampler, cap) at rollout time, the truncated importance-sampling correction
    of TRL (`vllm_importance_sampling_correction`, token_truncate, cap 3) and verl; null: off."""

    def __post_init__(self) -> None:
        require_finite("model.grpo.clip_low", self.clip_low, 0.0, 1 - 1e-12, "must be in [0, 1)")
        if self.importance_sampling_cap is not None:
            require_finite(
                "model.grpo.importance_sampling_cap",
                self.importance_sampling_cap,
                1e-12,
                math.inf,
                "must be > 0 or null (no correction)",
            )
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
        require_int(f"{key}.num_samples", self.num_samples)
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
            require_int(f"{key}.max_new_tokens", self.max_new_tokens)

    def sampling(self, rollout: RolloutOptions, seed: int) -> SamplingParams:
        """The held-out sampling parameters (the rollout's length unless given), seeded."""
        max_new_tokens = self.max_new_tokens or rollout.max_new_tokens
        return SamplingParams(self.num_samples, self.temperature, self.top_p, max_new_tokens, seed)


@dataclass
class OptionGroups:
    """The module's option groups, each as given or defaulted (`VPDModule.opts`)."""

    lora: LoraOptions | None
    rollout: RolloutOptions
    distill: DistillOptions
    estep: EStepOptions
    sdpo: SdpoOptions
    grpo: GrpoOptions
    validation: ValidationOptions

    @classmethod
    def from_given(cls, **groups: object) -> OptionGroups:
        """From dataclasses, dicts (a checkpoint's hparams) or None (defaults; LoRA: off)."""
        lora = groups.pop("lora")
        return cls(
            lora=as_options(LoraOptions, lora) if lora is not None else None,
            **{name: as_options(OPTION_GROUPS[name], value) for name, value in groups.items()},
        )

    def as_hparams(self) -> dict:
        """Plain dicts, so that checkpoints load with weights_only=True."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


OPTION_GROUPS: dict[str, type] = {
    "lora": LoraOptions,
    "rollout": RolloutOptions,
    "distill": DistillOptions,
    "estep": EStepOptions,
    "sdpo": SdpoOptions,
    "grpo": GrpoOptions,
    "validation": ValidationOptions,
}


def _plain(group: object) -> dict | None:
    return asdict(group) if group is not None else None


def as_options(cls: type, value: object) -> object:
    """An option group from its dataclass, a dict (a checkpoint's hparams) or None (defaults)."""
    if value is None:
        return cls()
    if isinstance(value, dict):
        return cls(**value)
    if not isinstance(value, cls):
        raise UserInputError(f"expected {cls.__name__} or a mapping, got {type(value).__name__}")
    return value
