"""One step of every method on the tiny model, the E-step's cadence and BCO state, bad options."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch

from vpd_lightning.options import DistillOptions, EStepOptions, SdpoOptions
from vpd_lightning.trainer.module import VPDModule
from vpd_lightning.trainer.stepping import NonFiniteLossError

from .helpers import changed, lora, snapshot, tiny_data, tiny_module, tiny_trainer


class Recorder:
    """Wraps log_step_metrics to keep every step's metrics."""

    def __init__(self, module: VPDModule) -> None:
        self.rows: list[dict] = []
        original = module.log_step_metrics

        def log_step_metrics(metrics):
            self.rows.append(dict(metrics))
            return original(metrics)

        module.log_step_metrics = log_step_metrics


def fit(module: VPDModule, tmp_path, steps: int = 1, **trainer_overrides) -> Recorder:
    recorder = Recorder(module)
    tiny_trainer(tmp_path, steps, **trainer_overrides).fit(module, datamodule=tiny_data())
    return recorder


METHODS = [
    pytest.param(dict(method="vpd"), id="vpd-shared-full"),
    pytest.param(dict(method="vpd", lora=lora()), id="vpd-shared-lora"),
    pytest.param(dict(method="vpd", teacher_mode="adapter", lora=lora()), id="vpd-adapter"),
    pytest.param(dict(method="sdpo"), id="sdpo-current"),
    pytest.param(dict(method="sdpo", sdpo=SdpoOptions(teacher="ema")), id="sdpo-ema"),
    pytest.param(
        dict(method="sdpo", sdpo=SdpoOptions(teacher="interpolate")), id="sdpo-interpolate-full"
    ),
    pytest.param(
        dict(method="sdpo", lora=lora(), sdpo=SdpoOptions(teacher="interpolate")),
        id="sdpo-interpolate-lora",
    ),
    pytest.param(dict(method="opsd", feedback_source="reference"), id="opsd"),
    pytest.param(dict(method="grpo"), id="grpo"),
    pytest.param(dict(method="vpd", distill=DistillOptions(grpo_coef=0.5)), id="vpd-hybrid"),
    pytest.param(dict(method="sdpo", feedback_source="sibling"), id="sdpo-sibling"),
    pytest.param(dict(method="vpd", feedback_source="self_critique"), id="vpd-self-critique"),
    pytest.param(
        dict(method="vpd", estep=EStepOptions(every=1, length_normalize=True)),
        id="vpd-length-normalized",
    ),
    pytest.param(
        dict(method="sdpo", updates_per_batch=2, distill=DistillOptions(trust_region_coef=0.1)),
        id="sdpo-trust-region",
    ),
    pytest.param(
        dict(method="vpd", estep=EStepOptions(every=1, prior="initial", target_kl=0.1)),
        id="vpd-fixed-prior-full",
    ),
    pytest.param(
        dict(
            method="vpd",
            teacher_mode="adapter",
            lora=lora(),
            estep=EStepOptions(every=1, prior="initial"),
        ),
        id="vpd-fixed-prior-adapter",
    ),
]


@pytest.mark.parametrize("options", METHODS)
def test_one_step_of_each_method_updates_the_student_with_finite_losses(options, tmp_path):
    module = tiny_module(**options)
    params = module.policy.student_parameters()
    before = snapshot(params)
    recorder = fit(module, tmp_path)
    (row,) = recorder.rows
    losses = {k: v for k, v in row.items() if k.endswith("loss")}
    assert losses and all(math.isfinite(v) for v in losses.values()), row
    assert changed(before, params)
    assert module.trainer.global_step == 1
    if options.get("method", "vpd") == "vpd":
        assert "estep/loss" in row and "estep/implicit_reward" in row


def test_adapter_mode_steps_touch_only_their_own_adapter(tmp_path):
    module = tiny_module(
        method="vpd", teacher_mode="adapter", lora=lora(), estep=EStepOptions(every=2)
    )
    student, teacher = module.policy.student_parameters(), module.policy.teacher_parameters()
    base = [p for n, p in module.policy.model.named_parameters() if "lora_" not in n]
    s0, t0, b0 = snapshot(student), snapshot(teacher), snapshot(base)
    fit(module, tmp_path, steps=1)  # an M-step only: F=2
    assert changed(s0, student) and not changed(t0, teacher) and not changed(b0, base)
    assert len(module.estep.buffer) == 4

    s1 = snapshot(student)
    stats = module.estep.update(
        module.policy, module.batches_of(module.estep.buffer), module.stepper
    )
    assert math.isfinite(stats["estep/loss"])
    assert changed(t0, teacher) and not changed(s1, student) and not changed(b0, base)


@pytest.mark.parametrize("lora_options", [None, lora()], ids=["full", "lora"])
def test_fixed_prior_is_the_initial_student_and_leaves_the_live_weights(lora_options, tmp_path):
    module = tiny_module(lora=lora_options, estep=EStepOptions(every=2, prior="initial"))
    reference = copy.deepcopy(module.policy)  # the initial student, kept aside
    fit(module, tmp_path, steps=1)  # one M-step, no E-step (F=2): the student has moved
    trained = snapshot(module.policy.student_parameters())
    batch = module.batches_of(module.estep.buffer)[0].student

    hidden, weight = module.policy.prior_features(batch)
    with torch.no_grad():
        expected = reference.hidden(batch) @ reference.head_weight.T
        live = module.policy.hidden(batch) @ module.policy.head_weight.T
    torch.testing.assert_close(hidden @ weight.T, expected)
    assert not torch.allclose(live, expected)
    assert not changed(trained, module.policy.student_parameters())


def test_estep_runs_every_F_steps_on_the_buffered_rollouts(tmp_path):
    module = tiny_module(estep=EStepOptions(every=3))
    sizes = []
    original = module.estep.update

    def spy(policy, batches, runner):
        sizes.append((module.global_step, sum(len(b.rollouts) for b in batches)))
        return original(policy, batches, runner)

    module.estep.update = spy
    recorder = fit(module, tmp_path, steps=7)
    # the E-step ends the 3rd and 6th steps (global_step already counts their student update),
    # each time on 3 steps x 2 prompts x 2 samples
    assert sizes == [(3, 12), (6, 12)]
    assert [("estep/loss" in row) for row in recorder.rows] == [
        False,
        False,
        True,
        False,
        False,
        True,
        False,
    ]
    assert module.estep.steps_since == 1 and len(module.estep.buffer) == 4


def test_bco_delta_includes_the_batch_before_the_loss_uses_it(tmp_path):
    """After the first E-step delta is that batch's mean implicit reward (not 0.1 of it), and the
    logged delta is the value the loss used: a bias-corrected EMA of the batch means."""
    module = tiny_module(estep=EStepOptions(every=1, delta_momentum=0.9, beta=0.5))
    recorder = fit(module, tmp_path, steps=2)
    r1, r2 = (row["estep/implicit_reward"] for row in recorder.rows)
    assert abs(r1) > 1e-6
    d1, d2 = (row["estep/delta"] for row in recorder.rows)
    assert d1 == pytest.approx(r1, rel=1e-4, abs=1e-7)
    expected = (0.9 * 0.1 * r1 + 0.1 * r2) / (1 - 0.9**2)
    assert d2 == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert module.estep.delta == pytest.approx(d2, rel=1e-9)


def test_adaptive_beta_moves_beta(tmp_path):
    module = tiny_module(estep=EStepOptions(every=1, target_kl=1e-9, beta_rate=0.5))
    recorder = fit(module, tmp_path, steps=1)
    assert recorder.rows[0]["estep/teacher_kl"] >= 0
    assert module.estep.beta == pytest.approx(0.1 * math.exp(0.5))


def _poison_mstep(monkeypatch) -> None:
    """Every M-step loss becomes NaN; E-step losses stay finite."""
    import vpd_lightning.algorithm.mstep as mstep_lib

    real = mstep_lib.mstep_loss

    def poisoned(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return loss * float("nan"), stats

    monkeypatch.setattr(mstep_lib, "mstep_loss", poisoned)


def test_nonfinite_student_losses_stop_the_run_even_when_the_teacher_is_finite(
    tmp_path, monkeypatch
):
    _poison_mstep(monkeypatch)
    module = tiny_module(
        method="vpd", teacher_mode="adapter", lora=lora(), max_nonfinite_in_a_row=2
    )
    params = module.policy.student_parameters()
    before = snapshot(params)
    with (
        pytest.warns(UserWarning, match="non-finite student loss"),
        pytest.raises(NonFiniteLossError, match="2 non-finite student losses in a row"),
    ):
        fit(module, tmp_path, steps=20)
    assert not changed(before, params)
    assert module.guard.total == {"student": 2, "teacher": 0}


def test_a_skipped_step_still_counts_and_is_logged_as_skipped(tmp_path, monkeypatch):
    _poison_mstep(monkeypatch)
    module = tiny_module(method="sdpo", max_nonfinite_in_a_row=10)
    trainer = tiny_trainer(tmp_path, 3)
    recorder = Recorder(module)
    with pytest.warns(UserWarning, match="non-finite student loss"):
        trainer.fit(module, datamodule=tiny_data())
    assert trainer.global_step == 3
    assert [row["mstep/skipped"] for row in recorder.rows] == [1.0, 1.0, 1.0]
    assert recorder.rows[-1]["train/nonfinite_student_total"] == 3.0


def test_validation_logs_mean_pass_and_teacher_accuracy(tmp_path):
    from vpd_lightning.options import ValidationOptions

    module = tiny_module(
        validation=ValidationOptions(num_samples=2, pass_k=[1, 2], temperature=1.0, teacher=True)
    )
    trainer = tiny_trainer(tmp_path, 1, limit_val_batches=1)
    (results,) = trainer.validate(module, datamodule=tiny_data(), verbose=False)
    assert set(results) == {"val/mean@2", "val/pass@1", "val/pass@2", "val/teacher_repair_rate"}
    assert all(0.0 <= v <= 1.0 or math.isnan(v) for v in results.values())


class CopyingEngine:
    """Student: right on the first held-out question, wrong on the others. Teacher: copies an
    answer its context states ("Correct: X"), else answers wrongly: it knows nothing but what the
    context tells it."""

    def __init__(self, tokenizer, records: list[dict]) -> None:
        self.tokenizer, self.records, self.teacher_texts = tokenizer, records, []

    def reply(self, text: str) -> str:
        if "Feedback on a previous attempt" in text:
            self.teacher_texts.append(text)
            copied = re.search(r"Correct: (-?\d+)", text)
            return f"<answer>{copied.group(1) if copied else -999}</answer>"
        index = next(i for i, r in enumerate(self.records) if r["prompt"] in text)
        answer = self.records[index]["answer"]
        return f"<answer>{answer if index == 0 else answer + 1}</answer>"

    def generate(self, prompts, params) -> list[list[int]]:
        eos = self.tokenizer.eos_token_id
        out = []
        for ids in prompts:
            reply = self.tokenizer.encode(self.reply(self.tokenizer.decode(ids))) + [eos]
            out += [reply] * params.num_samples
        return out


def test_teacher_repair_rate_counts_only_wrong_attempts_whose_feedback_hides_the_answer(tmp_path):
    """Issue 12, defect 4: a teacher shown "Correct: X" when the student was right beats the
    student by copying. The repair rate counts only the student's wrong attempts, so a teacher
    that can only copy repairs nothing."""
    from vpd_lightning.options import ValidationOptions

    module = tiny_module(validation=ValidationOptions(num_samples=2, pass_k=[1], teacher=True))
    data = tiny_data()
    data.setup("validate")
    engine = CopyingEngine(module.tokenizer, module.task.records("test")[:2])
    module.engine = engine
    trainer = tiny_trainer(tmp_path, 1, limit_val_batches=1)
    (results,) = trainer.validate(module, datamodule=data, verbose=False)
    assert results["val/mean@2"] == 0.5  # the student is right on one question of two
    assert results["val/teacher_repair_rate"] == 0.0
    assert len(engine.teacher_texts) == 4  # every attempt is answered (FSDP2-safe), 2 count
    failed = [t for t in engine.teacher_texts if "Correct:" not in t]
    assert len(failed) == 2 and all("Your answer" in t for t in failed)


def test_teacher_validation_refuses_feedback_that_states_the_answer():
    from vpd_lightning.errors import UserInputError
    from vpd_lightning.options import ValidationOptions
    from vpd_lightning.tasks import ArithmeticTask

    task = ArithmeticTask(num_ops=2, max_operand=9, num_train=8, num_test=2, feedback="solution")
    module = tiny_module(validation=ValidationOptions(teacher=True), task=task)
    trainer = tiny_trainer(Path("/tmp"), 1)
    with pytest.raises(UserInputError, match="states the correct answer"):
        trainer.validate(module, datamodule=tiny_data(), verbose=False)


class FixedEngine:
    """Every prompt gets the same completion: two runs see identical rollouts."""

    def __init__(self, completion: list[int]) -> None:
        self.completion = completion

    def generate(self, prompts, params) -> list[list[int]]:
        return [list(self.completion) for _ in prompts for _ in range(params.num_samples)]


def test_adapter_teacher_estep_gradient_is_the_same_with_gradient_checkpointing(
    tmp_path, monkeypatch
):
    """The backward of the E-step must see the teacher adapter, also when checkpointing
    recomputes the forward during backward (the student adapter differs from the teacher's)."""
    from vpd_lightning.policy.models import TEACHER_ADAPTER, adapter_parameters
    from vpd_lightning.trainer.stepping import Stepper

    grads: dict[bool, list[torch.Tensor]] = {}
    original = Stepper.step

    def recording(self, role, loss, counted):
        if role == "teacher":
            params = self.module.policy.teacher_parameters()
            grads[self.module.hparams.gradient_checkpointing] = [
                torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params
            ]
        return original(self, role, loss, counted)

    monkeypatch.setattr(Stepper, "step", recording)
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = tiny_module(
            teacher_mode="adapter", lora=lora(), gradient_checkpointing=checkpointing
        )
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():  # a teacher adapter that differs from the student's
            for p in adapter_parameters(module.policy.model, TEACHER_ADAPTER):
                p.add_(0.5 * torch.randn(p.shape, generator=generator))
        eos = module.tokenizer.eos_token_id
        module.engine = FixedEngine(module.tokenizer.encode("<answer>7</answer>") + [eos])
        fit(module, tmp_path / str(checkpointing), steps=1)
    plain, checkpointed = grads[False], grads[True]
    assert sum(float(g.norm()) for g in plain) > 0
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


class WeightRecordingEngine(FixedEngine):
    """Records, at each `generate`, the first student parameter the network runs with."""

    def __init__(self, completion: list[int], module) -> None:
        super().__init__(completion)
        self.module, self.seen = module, []

    def generate(self, prompts, params) -> list[list[int]]:
        self.seen.append(self.module.policy.student_parameters()[0].detach().clone())
        return super().generate(prompts, params)


def test_teacher_repair_rate_samples_the_teacher_sdpo_distils_from(tmp_path):
    """SDPO distils from its EMA weights: the repair rate must sample those, not the live ones
    (the teacher the method uses; issue 23), and leave the live weights as they were."""
    from vpd_lightning.options import ValidationOptions

    module = tiny_module(
        method="sdpo", validation=ValidationOptions(num_samples=1, pass_k=[1], teacher=True)
    )
    live = module.policy.student_parameters()[0]
    with torch.no_grad():  # an EMA that has drifted from the live weights
        for value in module.policy.snapshot.values.values():
            value.add_(0.25)
    ema = module.policy.snapshot.values[module.policy.snapshot.names[0]].clone()
    before = live.detach().clone()
    eos = module.tokenizer.eos_token_id
    module.engine = WeightRecordingEngine(
        module.tokenizer.encode("<answer>1</answer>") + [eos], module
    )
    data = tiny_data()
    tiny_trainer(tmp_path, 1, limit_val_batches=1).validate(module, datamodule=data, verbose=False)
    student_pass, teacher_pass = module.engine.seen
    torch.testing.assert_close(student_pass, before, rtol=0, atol=0)
    torch.testing.assert_close(teacher_pass, ema, rtol=0, atol=0)
    torch.testing.assert_close(live.detach(), before, rtol=0, atol=0)


def test_an_interpolated_teacher_cannot_be_sampled_for_the_repair_rate():
    from vpd_lightning.errors import UserInputError
    from vpd_lightning.options import SdpoOptions, ValidationOptions

    with pytest.raises(UserInputError, match=r"interpolated teacher .* cannot be sampled"):
        tiny_module(
            method="sdpo",
            sdpo=SdpoOptions(teacher="interpolate"),
            validation=ValidationOptions(teacher=True),
        )


def test_vpd_without_its_e_step_trains_only_the_student(tmp_path):
    """`estep.every: 0` is the thesis's control: VPD's contexts and divergence, no teacher update."""
    module = tiny_module(estep=EStepOptions(every=0))
    recorder = fit(module, tmp_path, steps=3)
    assert not any("estep/loss" in row for row in recorder.rows)
    assert all("mstep/teacher_student_kl" in row for row in recorder.rows)
    assert module.estep.buffer == [] and module.estep.delta == 0.0
