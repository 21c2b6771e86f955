"""Checkpoints resume everything: N steps straight equal k steps + resume + N - k steps."""

from __future__ import annotations

import pytest
import torch

from vpd_lightning.options import EStepOptions, RolloutOptions, SdpoOptions

from .helpers import fit_run, lora


@pytest.mark.parametrize(
    "options",
    [
        # F=3 and a checkpoint at step 2: the E-step buffer and delta cross the checkpoint
        pytest.param(dict(method="vpd", estep=EStepOptions(every=3)), id="vpd-shared"),
        pytest.param(
            dict(method="vpd", teacher_mode="adapter", lora=lora(), estep=EStepOptions(every=3)),
            id="vpd-adapter",
        ),
        pytest.param(dict(method="sdpo", sdpo=SdpoOptions(teacher="ema")), id="sdpo-ema"),
        pytest.param(
            dict(method="vpd", estep=EStepOptions(every=3, prior="initial")),
            id="vpd-fixed-prior",
        ),
        pytest.param(  # the cached engine's draws and merged LoRA cross the checkpoint too
            dict(
                method="vpd",
                lora=lora(),
                rollout=RolloutOptions(num_generations=2, max_new_tokens=8, engine="cached"),
                estep=EStepOptions(every=3),
            ),
            id="vpd-lora-cached-engine",
        ),
    ],
)
def test_resume_equals_straight_run(tmp_path, options):
    straight = fit_run(tmp_path / "a", options, steps=4)
    ckpt = tmp_path / "k2.ckpt"
    fit_run(tmp_path / "b", options, steps=2, ckpt_out=ckpt)
    resumed = fit_run(tmp_path / "c", options, steps=4, ckpt_in=ckpt)

    assert resumed.trainer.global_step == straight.trainer.global_step == 4
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), (name, a.flatten()[:4], b.flatten()[:4])
    for opt_a, opt_b in zip(straight.trainer.optimizers, resumed.trainer.optimizers, strict=True):
        for sa, sb in zip(opt_a.state.values(), opt_b.state.values(), strict=True):
            torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=0, atol=0)
    if straight.estep is not None:  # delta, beta, the cadence and the buffer
        assert straight.estep.state_dict() == resumed.estep.state_dict()
        assert [r.completion_ids for r in straight.estep.buffer] == [
            r.completion_ids for r in resumed.estep.buffer
        ]
    if straight.policy.snapshot is not None:
        for k, v in straight.policy.snapshot.values.items():
            torch.testing.assert_close(v, resumed.policy.snapshot.values[k], rtol=0, atol=0)
