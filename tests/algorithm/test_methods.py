"""The method table: one row per method, and the checks that read it."""

from __future__ import annotations

from typing import get_args

import pytest

from vpd_lightning.algorithm.methods import METHODS, check_combinations
from vpd_lightning.errors import UserInputError
from vpd_lightning.options import (
    DistillOptions,
    EStepOptions,
    Method,
    RolloutOptions,
    SdpoOptions,
)
from vpd_lightning.policy.roles import TeacherWeights


def combos(method: str, **overrides):
    options = dict(
        teacher_mode="shared",
        feedback_source=METHODS[method].default_feedback_source,
        lora=None,
        rollout=RolloutOptions(),
        distill=DistillOptions(),
        estep=EStepOptions(),
        updates_per_batch=1,
        has_teacher_optimizer=False,
        has_teacher_scheduler=False,
    )
    options.update(overrides)
    check_combinations(METHODS[method], **options)


def test_every_method_name_has_one_row():
    assert set(METHODS) == set(get_args(Method))
    assert all(name == spec.name for name, spec in METHODS.items())


def test_the_rows_say_what_each_method_is():
    vpd, sdpo, opsd, grpo = (METHODS[m] for m in ("vpd", "sdpo", "opsd", "grpo"))
    assert vpd.trains_teacher and not any(s.trains_teacher for s in (sdpo, opsd, grpo))
    assert not grpo.distils and grpo.grpo_coef(DistillOptions(grpo_coef=0.0)) == 1.0
    assert vpd.grpo_coef(DistillOptions(grpo_coef=0.3)) == 0.3
    ema = sdpo.teacher_weights(SdpoOptions(teacher="ema", ema_decay=0.1))
    assert ema == TeacherWeights(snapshot=True, ema_decay=0.1)
    mixed = sdpo.teacher_weights(SdpoOptions(teacher="interpolate", interpolation=0.3))
    assert mixed == TeacherWeights(snapshot=True, interpolation=0.3)
    assert sdpo.teacher_weights(SdpoOptions(teacher="current")) == TeacherWeights()
    assert opsd.teacher_weights(SdpoOptions()) == TeacherWeights(snapshot=True)
    assert vpd.teacher_weights(SdpoOptions()) == TeacherWeights()
    assert grpo.resolved_distill(DistillOptions()) is None
    assert vpd.resume_keys() == ("model.estep.prior", "model.teacher_optimizer")
    assert sdpo.resume_keys() == ("model.sdpo.teacher",) and grpo.resume_keys() == ()


@pytest.mark.parametrize("method", ["sdpo", "opsd", "grpo"])
def test_trained_teacher_settings_are_refused_without_an_e_step(method):
    with pytest.raises(
        UserInputError, match=rf"model.teacher_optimizer is for model.method: vpd .*not {method}"
    ):
        combos(method, has_teacher_optimizer=True)


def test_opsd_needs_the_reference_and_grpo_no_hybrid_term():
    with pytest.raises(UserInputError, match="method opsd shows the teacher the reference"):
        combos("opsd", feedback_source="verifier")
    with pytest.raises(UserInputError, match="with method grpo leave it 0"):
        combos("grpo", distill=DistillOptions(grpo_coef=0.5))
    with pytest.raises(UserInputError, match="needs at least 2"):
        combos(
            "vpd", distill=DistillOptions(grpo_coef=0.5), rollout=RolloutOptions(num_generations=1)
        )
    combos("vpd", distill=DistillOptions(grpo_coef=0.5))  # the hybrid is fine with a group
