"""What each method is, said once: the table every other module reads instead of comparing names.

| method | E-step (trained teacher) | M-step distils | GRPO weight | passive teacher | feedback | top-k (ranked by) |
|---|---|---|---|---|---|---|
| `vpd`  | yes | yes | `distill.grpo_coef` | -                     | verifier             | full |
| `sdpo` | no  | yes | `distill.grpo_coef` | `sdpo.teacher` weights | sibling_and_feedback | 100 (student) |
| `opsd` | no  | yes | `distill.grpo_coef` | the initial weights   | reference            | full |
| `grpo` | no  | no  | 1 (the whole update) | -                    | (no teacher)         | -    |

Adding a method is one row here (and its name in `options.Method`); the checks across option groups
below read the rows, so they hold for it too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from vpd_lightning.errors import (
    UserInputError,
    require,
    require_choice,
    require_finite,
    require_int,
)
from vpd_lightning.options import (
    DTYPE_NAMES,
    DistillOptions,
    EStepOptions,
    LoraOptions,
    Method,
    OptionGroups,
    RolloutOptions,
    SdpoOptions,
    TeacherMode,
)
from vpd_lightning.policy.roles import TeacherWeights
from vpd_lightning.rollout.contexts import FeedbackSource

PassiveTeacher = Literal["configured", "initial"]


@dataclass(frozen=True)
class MethodSpec:
    """One method's row of the table."""

    name: str
    trains_teacher: bool
    """An E-step trains the teacher (a second optimizer, δ and β, the E-step buffer)."""
    distils: bool
    """The student update has a divergence to a teacher that sees a context."""
    passive_teacher: PassiveTeacher | None
    """The teacher's weights when they are not trained: `configured` by `sdpo.teacher`, or the
    `initial` student's; None: the live (or trained) weights."""
    default_feedback_source: str
    """The teacher's context when `model.feedback_source` is null."""
    default_topk: int = 0
    """The M-step's top-k when `distill.topk` is null (0: the full vocabulary)."""
    default_topk_from: str = "teacher"
    """Whose top-k ids when `distill.topk_from` is null (`vpd_kernels`' default: the teacher's)."""
    required_feedback_source: str | None = None
    """The only context that makes the method what it is (OPSD: the reference solution)."""

    def grpo_coef(self, distill: DistillOptions) -> float:
        """The weight of GRPO's surrogate in the student update: all of it, or the hybrid term."""
        return distill.grpo_coef if self.distils else 1.0

    def teacher_weights(self, sdpo: SdpoOptions) -> TeacherWeights:
        """Which weights the teacher runs with when it is not trained (what `Policy` runs)."""
        kind = sdpo.teacher if self.passive_teacher == "configured" else self.passive_teacher
        return {
            None: TeacherWeights(),
            "current": TeacherWeights(),
            "initial": TeacherWeights(snapshot=True),
            "ema": TeacherWeights(snapshot=True, ema_decay=sdpo.ema_decay),
            "interpolate": TeacherWeights(snapshot=True, interpolation=sdpo.interpolation),
        }[kind]

    def resolved_distill(self, distill: DistillOptions) -> DistillOptions | None:
        """The M-step's divergence options with the top-k and whose ids resolved (topk None: the
        full vocabulary); None when the method does not distil."""
        if not self.distils:
            return None
        k = distill.topk if distill.topk is not None else self.default_topk
        ranked_by = distill.topk_from or self.default_topk_from
        return replace(distill, topk=k or None, topk_from=ranked_by)

    def resume_keys(self) -> tuple[str, ...]:
        """The settings of this method that a resume must not change (`trainer/checkpoint.py`)."""
        keys = ("model.estep.prior", "model.teacher_optimizer") if self.trains_teacher else ()
        return keys + (("model.sdpo.teacher",) if self.passive_teacher == "configured" else ())


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("vpd", True, True, None, "verifier"),
        MethodSpec(
            "sdpo",
            False,
            True,
            "configured",
            "sibling_and_feedback",
            default_topk=100,
            default_topk_from="student",
        ),
        MethodSpec(
            "opsd", False, True, "initial", "reference", required_feedback_source="reference"
        ),
        MethodSpec("grpo", False, False, None, "verifier"),
    )
}


def check_module_options(given: dict, opts: OptionGroups) -> tuple[MethodSpec, str]:
    """`VPDModule`'s top-level options one by one, then their combinations with the option
    groups; returns the method's row and the feedback source (null: the method's own)."""
    require_choice("model.method", given["method"], Method)
    require_choice("model.teacher_mode", given["teacher_mode"], TeacherMode)
    spec = METHODS[given["method"]]
    feedback_source = given["feedback_source"] or spec.default_feedback_source
    require_choice("model.feedback_source", feedback_source, FeedbackSource)
    dtypes = ", ".join(DTYPE_NAMES)
    require(
        given["dtype"] in DTYPE_NAMES, "model.dtype", given["dtype"], f"must be one of {dtypes}"
    )
    for name in (
        "max_context_tokens",
        "micro_batch_size",
        "updates_per_batch",
        "max_nonfinite_in_a_row",
        "verify_workers",
    ):
        require_int(f"model.{name}", given[name])
    threshold = given["success_threshold"]
    require_finite("model.success_threshold", threshold, 1e-12, 1.0, "must be in (0, 1]")
    for name in ("student_grad_clip", "teacher_grad_clip"):
        if given[name] is not None:
            require_finite(f"model.{name}", given[name], 1e-12, float("inf"), "must be > 0")
    if opts.validation.teacher and spec.teacher_weights(opts.sdpo).interpolation is not None:
        raise UserInputError(
            "model.validation.teacher = true with model.sdpo.teacher = interpolate: the "
            "interpolated teacher mixes two networks' logits and cannot be sampled from; use "
            "sdpo.teacher ema or current, or set model.validation.teacher: false"
        )
    check_combinations(
        spec,
        teacher_mode=given["teacher_mode"],
        feedback_source=feedback_source,
        lora=opts.lora,
        rollout=opts.rollout,
        distill=opts.distill,
        estep=opts.estep,
        updates_per_batch=given["updates_per_batch"],
        has_teacher_optimizer=given["teacher_optimizer"] is not None,
        has_teacher_scheduler=given["teacher_scheduler"] is not None,
    )
    return spec, feedback_source


def check_combinations(
    spec: MethodSpec,
    *,
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
    """Checks that involve the method and more than one option group; the first is raised."""
    trained_teacher_only = {
        "model.teacher_mode: adapter": teacher_mode == "adapter",
        "model.estep.prior: initial": estep.prior != "student",
        "model.teacher_optimizer": has_teacher_optimizer,
        "model.teacher_scheduler": has_teacher_scheduler,
    }
    trained = [n for n, s in METHODS.items() if s.trains_teacher]
    for setting, given in trained_teacher_only.items():
        if given and not spec.trains_teacher:
            raise UserInputError(
                f"{setting} is for model.method: {' or '.join(trained)} (the trained teacher), "
                f"not {spec.name}; remove it"
            )
    if teacher_mode == "adapter" and lora is None:
        raise UserInputError(
            "model.teacher_mode = 'adapter' needs LoRA: set model.lora (for example {r: 16})"
        )
    required = spec.required_feedback_source
    if required is not None and feedback_source != required:
        raise UserInputError(
            f"model.feedback_source = {feedback_source!r}: method {spec.name} shows the teacher "
            f"the {required} context; set model.feedback_source: {required}"
        )
    if not spec.distils and distill.grpo_coef:
        raise UserInputError(
            f"model.distill.grpo_coef = {distill.grpo_coef}: it adds GRPO to a distilling method; "
            f"with method {spec.name} leave it 0"
        )
    if spec.grpo_coef(distill) and rollout.num_generations < 2:
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
