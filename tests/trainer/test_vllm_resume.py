"""Resume with `model.rollout.engine: vllm`: 4 steps straight equal 2 steps + checkpoint + 2 more,
bit for bit (weights, optimizer state, E-step buffer), full fine-tuning and LoRA.

Why it can be exact: each request's seed is a pure function of (seed, step, rank, index), every
step's weights are pushed and checked before its sampling, and the prefix cache is reset by each
push, so a resumed engine sees the same weights, seeds and cache state as an uninterrupted one.
One vLLM instance serves the module's runs (each run's engine starts with nothing pushed): the
test's only shortcut, since an instance takes seconds to build."""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the tests need little

import pytest
import torch

from vpd_lightning.options import EStepOptions, RolloutOptions
from vpd_lightning.policy.tiny import build_tiny_model, build_tiny_tokenizer
from vpd_lightning.rollout.vllm_engine import VLLMEngine

from .helpers import fit_run, lora

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head32_model(tmp_path_factory):
    """The tiny model with 2 heads of 32 (vLLM's CPU attention serves head sizes 32 and up)."""
    folder = tmp_path_factory.mktemp("tiny-head32")
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(len(tokenizer), num_heads=2, num_kv_heads=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def shared_llm():
    holder = {}
    start = VLLMEngine._start

    def start_once(self, network):
        if "llm" not in holder:
            start(self, network)
            holder["llm"] = self.llm
        self.llm = holder["llm"]

    patch = pytest.MonkeyPatch()
    patch.setattr(VLLMEngine, "_start", start_once)
    yield holder
    patch.undo()


@pytest.mark.parametrize("adapter", [False, True], ids=["full", "lora"])
def test_resume_with_the_vllm_engine_equals_the_straight_run(
    tmp_path, head32_model, shared_llm, adapter
):
    options = dict(
        model=head32_model,
        rollout=RolloutOptions(num_generations=2, max_new_tokens=8, engine="vllm"),
        estep=EStepOptions(every=3),
    )
    if adapter:
        options["lora"] = lora()
    straight = fit_run(tmp_path / "a", options, steps=4)
    ckpt = tmp_path / "k2.ckpt"
    fit_run(tmp_path / "b", options, steps=2, ckpt_out=ckpt)
    resumed = fit_run(tmp_path / "c", options, steps=4, ckpt_in=ckpt)

    assert resumed.trainer.global_step == straight.trainer.global_step == 4
    assert resumed.engine.pushes >= 2  # the resumed run pushed its own weights, then new ones
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), (name, a.flatten()[:4], b.flatten()[:4])
    for opt_a, opt_b in zip(straight.trainer.optimizers, resumed.trainer.optimizers, strict=True):
        for sa, sb in zip(opt_a.state.values(), opt_b.state.values(), strict=True):
            assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    assert straight.estep.state_dict() == resumed.estep.state_dict()
    assert [r.completion_ids for r in straight.estep.buffer] == [
        r.completion_ids for r in resumed.estep.buffer
    ]
