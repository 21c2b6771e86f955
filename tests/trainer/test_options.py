"""Option groups refuse bad values where they are defined; combinations are checked in one place."""

from __future__ import annotations

import pytest
import torch

from vpd_lightning.errors import UserInputError
from vpd_lightning.options import (
    DistillOptions,
    EStepOptions,
    GrpoOptions,
    LoraOptions,
    RolloutOptions,
    SdpoOptions,
    ValidationOptions,
)
from vpd_lightning.trainer.module import VPDModule

from .helpers import lora, tiny_module

BAD_GROUP_VALUES = [
    (RolloutOptions, "num_generations", 0),
    (RolloutOptions, "num_generations", -2),
    (RolloutOptions, "max_new_tokens", 0),
    (RolloutOptions, "temperature", -0.1),
    (RolloutOptions, "temperature", float("nan")),
    (RolloutOptions, "top_p", 0.0),
    (RolloutOptions, "top_p", 1.5),
    (ValidationOptions, "num_samples", 0),
    (ValidationOptions, "pass_k", [0]),
    (ValidationOptions, "pass_k", [2]),  # > num_samples
    (ValidationOptions, "pass_k", []),
    (ValidationOptions, "temperature", -1.0),
    (ValidationOptions, "top_p", 0.0),
    (ValidationOptions, "max_new_tokens", 0),
    (EStepOptions, "every", -1),
    (EStepOptions, "beta", 0.0),
    (EStepOptions, "delta_momentum", 1.0),
    (EStepOptions, "target_kl", 0.0),
    (EStepOptions, "prior", "final"),
    (DistillOptions, "divergence", "tvd"),
    (DistillOptions, "jsd_beta", 1.0),
    (DistillOptions, "temperature", 0.0),
    (DistillOptions, "trust_region_coef", -0.1),
    (DistillOptions, "grpo_coef", -1.0),
    (SdpoOptions, "teacher", "frozen"),
    (SdpoOptions, "ema_decay", 0.0),
    (SdpoOptions, "interpolation", 1.5),
    (GrpoOptions, "clip_low", 1.0),
    (GrpoOptions, "clip_high", -0.1),
    (LoraOptions, "r", 0),
    (LoraOptions, "dropout", 1.0),
]


@pytest.mark.parametrize(("group", "name", "value"), BAD_GROUP_VALUES)
def test_each_group_refuses_bad_values_naming_key_value_and_rule(group, name, value):
    with pytest.raises(UserInputError) as error:
        group(**{name: value})
    message = str(error.value)
    assert f".{name} = {value!r}: " in message, message
    assert "\n" not in message


def test_defaults_are_valid():
    for group in (RolloutOptions, ValidationOptions, EStepOptions, DistillOptions, SdpoOptions):
        group()
    GrpoOptions()
    LoraOptions()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("micro_batch_size", 0),
        ("updates_per_batch", 0),
        ("verify_workers", 0),
        ("max_context_tokens", -1),
        ("max_nonfinite_in_a_row", 0),
        ("success_threshold", 0.0),
        ("success_threshold", 1.5),
        ("student_grad_clip", 0.0),
        ("dtype", "float8"),
        ("method", "ppo"),
    ],
)
def test_top_level_options_are_checked_before_the_model_loads(name, value, monkeypatch):
    import vpd_lightning.trainer.module as module_lib

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(module_lib, "load_tokenizer", no_loading)
    with pytest.raises(UserInputError, match=f"model.{name} = "):
        VPDModule(**{name: value})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(method="sdpo", teacher_mode="adapter", lora=lora()), "teacher_mode: adapter is for"),
        (dict(method="grpo", estep=EStepOptions(prior="initial")), "estep.prior: initial is for"),
        (dict(method="opsd", feedback_source="verifier"), "feedback_source: reference"),
        (dict(method="grpo", distill=DistillOptions(grpo_coef=1.0)), "leave it 0"),
        (dict(distill=DistillOptions(trust_region_coef=0.1)), "updates_per_batch > 1"),
        (dict(method="vpd", teacher_mode="adapter"), "needs LoRA"),
        (
            dict(method="grpo", rollout=RolloutOptions(num_generations=1)),
            "num_generations = 1: GRPO",
        ),
        (
            dict(feedback_source="sibling", rollout=RolloutOptions(num_generations=1)),
            "sibling needs at least 2",
        ),
    ],
)
def test_bad_combinations_fail_before_training(options, message):
    with pytest.raises(UserInputError, match=message):
        tiny_module(**options)


def test_teacher_optimizer_for_a_method_without_teacher_is_an_error():
    with pytest.raises(UserInputError, match=r"model\.teacher_optimizer is for model\.method: vpd"):
        VPDModule(method="sdpo", teacher_optimizer=lambda p: torch.optim.SGD(p, lr=0.1))


def test_option_groups_load_from_checkpoint_dicts():
    module_options = tiny_module().hparams
    assert RolloutOptions(**module_options["rollout"]).num_generations == 2
    assert EStepOptions(**module_options["estep"]).every == 1


def test_each_method_gets_its_own_defaults_when_options_are_null():
    """SDPO as its reference code runs it: sibling solution + feedback, EMA teacher, top-100 from
    the student; OPSD the reference solution; GRPO TRL's std-scaled advantages."""
    from vpd_lightning.algorithm.methods import METHODS
    from vpd_lightning.options import GrpoOptions, SdpoOptions

    def resolved_topk(method, distill):
        return METHODS[method].resolved_distill(distill).topk

    assert SdpoOptions().teacher == "ema" and SdpoOptions().ema_decay == 0.05
    assert GrpoOptions().normalize_std
    assert resolved_topk("sdpo", DistillOptions()) == 100
    assert METHODS["sdpo"].resolved_distill(DistillOptions()).topk_from == "student"
    assert METHODS["vpd"].resolved_distill(DistillOptions(topk=8)).topk_from == "teacher"
    assert (
        METHODS["sdpo"].resolved_distill(DistillOptions(topk_from="teacher")).topk_from == "teacher"
    )
    assert resolved_topk("sdpo", DistillOptions(topk=0)) is None  # 0: the full vocabulary
    assert resolved_topk("vpd", DistillOptions()) is None
    assert resolved_topk("vpd", DistillOptions(topk=8)) == 8
    for method, source in [("sdpo", "sibling_and_feedback"), ("opsd", "reference"),
                           ("vpd", "verifier")]:  # fmt: skip
        assert tiny_module(method=method).feedback_source == source
    assert tiny_module(method="sdpo", feedback_source="verifier").feedback_source == "verifier"
    with pytest.raises(UserInputError, match=r"model\.distill\.topk = -1: must be an integer >= 0"):
        DistillOptions(topk=-1)


def test_the_interpolated_teacher_defaults_to_sdpos_trust_region_teacher():
    """SDPO's trust-region teacher is torch.lerp(initial logits, current logits, 0.05)
    (lasgroup/SDPO verl/workers/actor/dp_actor.py:51-64 with teacher_update_rate 0.05): by default
    the interpolated teacher is 0.95 initial + 0.05 current, not an even mix."""
    from vpd_lightning.policy.packing import pack

    module = tiny_module(method="sdpo", sdpo=SdpoOptions(teacher="interpolate"))
    policy = module.policy
    with torch.no_grad():  # the student moves away from its initial snapshot
        for p in policy.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = pack([[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]], pad_id=0)

    def logits(hidden, weight=None):
        return hidden @ (policy.head_weight if weight is None else weight).T

    hidden, weight = policy.teacher_features(batch)
    with torch.no_grad():
        current = logits(policy.hidden(batch))
        with policy.snapshot.swapped_in():
            initial = logits(policy.hidden(batch), policy.head_weight.detach().clone())
    assert not torch.allclose(initial, current, atol=1e-3)
    torch.testing.assert_close(logits(hidden, weight), torch.lerp(initial, current, 0.05))
