"""The `vllm` rollout engine on SmolLM2 (float32) against `generate` and the trainer's log-probs:
greedy equal token for token, sampled log-probs equal, new weights (tied embeddings, LoRA) pushed,
a wrong copy of the weights caught, and the README's quickstart command with the vllm engine runs
as written (shortened). One vLLM instance serves the whole module (vLLM is installed by `make
test`; these tests fail, not skip, without it)."""

from __future__ import annotations

import copy
import logging
import os
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the tests need little

import pytest
import torch

from vpd_lightning.algorithm.objectives import truncated_importance_weights
from vpd_lightning.errors import UserInputError
from vpd_lightning.options import LoraOptions, SdpoOptions
from vpd_lightning.policy.models import (
    SMOLLM2_ALIAS,
    generation_eos_ids,
    load_causal_lm,
    load_tokenizer,
)
from vpd_lightning.policy.roles import Policy
from vpd_lightning.rollout.engine import HFGenerateEngine, SamplingParams
from vpd_lightning.rollout.vllm_engine import VLLMEngine

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = ["What is 7 + 5?", "Name a colour of the sky."]
GREEDY = SamplingParams(num_samples=1, temperature=0.0, max_new_tokens=16)


@pytest.fixture(scope="module")
def smollm2():
    tokenizer = load_tokenizer(SMOLLM2_ALIAS)
    network = load_causal_lm(SMOLLM2_ALIAS, torch.float32)
    eos = sorted({tokenizer.eos_token_id, *generation_eos_ids(network)})
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False
        )
        for q in QUESTIONS
    ]
    engine = VLLMEngine(network, tokenizer.pad_token_id, eos)
    engine._start(network)  # now, not at the first call: any test may be the first to use it
    yield SimpleNamespace(
        tokenizer=tokenizer,
        network=network,
        eos=eos,
        prompts=prompts,
        engine=engine,
        reference=HFGenerateEngine(network, tokenizer.pad_token_id, eos),
    )
    engine.close()


def trainer_logprobs(network, prompt: list[int], completion: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = network(input_ids=torch.tensor([prompt + completion])).logits[0].float()
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return torch.log_softmax(logits[positions], -1).gather(-1, torch.tensor(completion)[:, None])[
        :, 0
    ]


def test_greedy_equals_generate_token_for_token(smollm2):
    got = smollm2.engine.generate(smollm2.prompts, GREEDY)
    assert got == smollm2.reference.generate(smollm2.prompts, GREEDY)
    assert smollm2.engine.pushes == 1 and smollm2.engine.last_probe_gap < 1e-4
    smollm2.engine.generate(smollm2.prompts, GREEDY)
    assert smollm2.engine.pushes == 1  # weights unchanged: nothing pushed again


def test_sampled_tokens_log_probs_equal_the_trainers_and_follow_the_seed(smollm2):
    params = SamplingParams(num_samples=2, temperature=1.0, max_new_tokens=16, seed=3)
    first = smollm2.engine.generate(smollm2.prompts, params)
    logprobs = smollm2.engine.last_logprobs
    assert smollm2.engine.generate(smollm2.prompts, params) == first
    params.seed = 4
    assert smollm2.engine.generate(smollm2.prompts, params) != first
    for i, completion in enumerate(first):
        expected = trainer_logprobs(smollm2.network, smollm2.prompts[i // 2], completion)
        got = torch.tensor(logprobs[i])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_after_a_change_of_the_tied_embeddings_it_samples_from_the_new_weights(smollm2):
    network = smollm2.network
    embedding = network.get_input_embeddings().weight
    assert network.get_output_embeddings().weight is embedding  # SmolLM2 ties them
    before = smollm2.engine.generate(smollm2.prompts, GREEDY)
    saved = embedding.detach().clone()
    pushes = smollm2.engine.pushes
    try:
        with torch.no_grad():
            embedding.add_(
                torch.randn_like(embedding, generator=torch.Generator().manual_seed(0)) * 0.02
            )
        after = smollm2.engine.generate(smollm2.prompts, GREEDY)
        assert smollm2.engine.pushes == pushes + 1
        assert after == smollm2.reference.generate(smollm2.prompts, GREEDY)
        assert after != before
    finally:
        with torch.no_grad():
            embedding.copy_(saved)
    assert smollm2.engine.generate(smollm2.prompts, GREEDY) == before


def test_a_lora_policy_samples_from_its_merged_weights(smollm2):
    policy = Policy(
        copy.deepcopy(smollm2.network), LoraOptions(r=4, alpha=8), False, None, SdpoOptions()
    )
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    engine = VLLMEngine(policy, smollm2.tokenizer.pad_token_id, smollm2.eos)
    engine.llm = smollm2.engine.llm  # one vLLM instance per module: the test's only shortcut
    try:
        got = engine.generate(smollm2.prompts, GREEDY)
        assert engine.last_probe_gap < 1e-4
        reference = HFGenerateEngine(policy, smollm2.tokenizer.pad_token_id, smollm2.eos)
        assert got == reference.generate(smollm2.prompts, GREEDY)
        assert got != smollm2.reference.generate(smollm2.prompts, GREEDY)
    finally:
        smollm2.engine.pushed = None  # the shared instance holds the LoRA weights now


def test_a_half_pushed_engine_fails_the_check_loudly(smollm2):
    """A packed group pushed in part (q without k and v) corrupts vLLM's model silently; the
    check after every push must catch it."""
    engine = smollm2.engine
    engine.generate(smollm2.prompts, GREEDY)
    q = smollm2.network.model.layers[0].self_attn.q_proj.weight
    try:
        with torch.inference_mode():  # as the engine pushes (its parameters are inference tensors)
            engine.llm.collective_rpc(
                "reload_weights",
                kwargs={
                    "weights_iterator": [("model.layers.0.self_attn.q_proj.weight", q.detach())],
                    "is_checkpoint_format": True,
                },
            )
            engine.llm.reset_prefix_cache()
            with pytest.raises(RuntimeError, match="does not hold the trainer's weights"):
                engine._check_push(smollm2.network, torch.float32)
    finally:
        engine.pushed = None
    engine.generate(smollm2.prompts, GREEDY)  # a full push repairs it
    assert engine.last_probe_gap < 1e-4


def test_fsdp2_and_unsupported_head_sizes_are_refused_in_one_line():
    sharded = SimpleNamespace(sharded_units=[object()])
    with pytest.raises(UserInputError, match="fsdp2"):
        VLLMEngine(sharded, 0, [1]).generate([[1, 2]], GREEDY)
    from vpd_lightning.rollout.vllm_engine import check_cpu_head_size

    config = SimpleNamespace(head_dim=None, hidden_size=64, num_attention_heads=4)
    with pytest.raises(UserInputError, match="head size is 16"):
        check_cpu_head_size(config)


def test_only_the_tokenizerless_chat_warmup_warning_is_silenced(caplog):
    from vpd_lightning.rollout.vllm_engine import _without_tokenizerless_chat_warmup_warning

    logger = logging.getLogger("vllm.renderers.base")
    tokenizerless = ValueError("cannot get the tokenizer: skip_tokenizer_init=True")
    other = ValueError("the chat template has a syntax error")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        with _without_tokenizerless_chat_warmup_warning():
            for error in (tokenizerless, other):
                try:
                    raise error
                except ValueError:
                    logger.warning("Chat template warmup failed", exc_info=True)
        try:
            raise tokenizerless
        except ValueError:
            logger.warning("Chat template warmup failed", exc_info=True)  # outside: kept
    assert [r.exc_info[1] for r in caplog.records] == [other, tokenizerless]


def test_truncated_importance_weights_are_capped_ratios_without_gradient():
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    sampler = torch.tensor([-1.0, -3.0, -5.0])
    weights = truncated_importance_weights(logp, sampler, cap=3.0)
    torch.testing.assert_close(weights, torch.tensor([1.0, torch.e, 3.0]))
    assert not weights.requires_grad


def test_the_readmes_vllm_quickstart_command_runs(smollm2, tmp_path, monkeypatch, capsys):
    """The command as the README gives it, shortened, in this process; its engine is handed the
    module's vLLM instance (built for the same SmolLM2 config) instead of building its own."""
    from vpd_lightning.cli import main

    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("#### vLLM (`model.rollout.engine: vllm`)") :]
    (line,) = re.findall(r"^\.venv/bin/python -m vpd_lightning (fit .*)$", block, re.M)[:1]
    args = shlex.split(line)
    assert "--model.rollout.engine" in args and "configs/quickstart.yaml" in args
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        VLLMEngine, "_start", lambda self, network: setattr(self, "llm", smollm2.engine.llm)
    )
    short = ["--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false"]
    short += ["--data.val_size", "2", "--data.prompts_per_step", "1"]
    short += ["--model.rollout.max_new_tokens", "8", "--model.validation.max_new_tokens", "8"]
    try:
        cli = main([*args, *short])
    finally:  # the CLI closed the shared instance; a later use starts a new one
        smollm2.engine.llm = smollm2.engine.pushed = None
    assert "vpd_lightning: training finished" in capsys.readouterr().out
    assert cli.model.engine.pushes >= 1 and cli.model.engine.last_probe_gap < 1e-3
