"""The `cached` rollout engine against `generate` and against the model's own probabilities."""

from __future__ import annotations

import pytest
import torch

from vpd_lightning.errors import UserInputError
from vpd_lightning.options import LoraOptions, RolloutOptions
from vpd_lightning.policy.roles import Policy, TeacherWeights
from vpd_lightning.policy.tiny import build_tiny_model
from vpd_lightning.rollout import render_prompt
from vpd_lightning.rollout.cached import CachedEngine
from vpd_lightning.rollout.engine import HFGenerateEngine, SamplingParams

from .helpers import tiny_task


def lora_policy(tokenizer, dtype=torch.float64) -> Policy:
    """A tiny policy whose LoRA adapter matters (B is random, not PEFT's zeros)."""
    torch.manual_seed(0)
    network = build_tiny_model(len(tokenizer)).to(dtype)
    policy = Policy(network, LoraOptions(r=4, alpha=8), False, TeacherWeights())
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return policy


def prompts(tokenizer, count=3):
    records = tiny_task().records("train")[:count]
    out = [render_prompt(tokenizer, r) for r in records]
    if count > 1:  # unequal lengths: the left padding must not matter
        out[1] = out[1][:-5] + out[1][-3:]
    return out


def engines(tokenizer, policy):
    eos = [tokenizer.eos_token_id]
    return (
        HFGenerateEngine(policy, tokenizer.pad_token_id, eos),
        CachedEngine(policy, tokenizer.pad_token_id, eos),
    )


def test_greedy_equals_generate_token_for_token_with_an_unmerged_lora(tiny_tokenizer):
    policy = lora_policy(tiny_tokenizer)
    reference, cached = engines(tiny_tokenizer, policy)
    ids = prompts(tiny_tokenizer)
    params = SamplingParams(num_samples=2, temperature=0.0, max_new_tokens=16)
    expected = reference.generate(ids, params)
    assert cached.generate(ids, params) == expected
    with policy.model.disable_adapter():  # the adapter changes the answer: it was merged in
        assert cached.generate(ids, params) != expected


def test_sampling_leaves_the_live_weights_and_adapter_path_untouched(tiny_tokenizer):
    policy = lora_policy(tiny_tokenizer)
    _, cached = engines(tiny_tokenizer, policy)
    ids = torch.tensor([prompts(tiny_tokenizer)[0]])
    before = {n: p.clone() for n, p in policy.model.named_parameters()}
    logits = policy.model(input_ids=ids).logits
    cached.generate(ids.tolist(), SamplingParams(num_samples=2, max_new_tokens=4, seed=1))
    for name, p in policy.model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert torch.equal(policy.model(input_ids=ids).logits, logits)
    assert policy.model.training  # the engine restores train mode


def test_sampled_tokens_have_the_models_nucleus_probabilities(tiny_tokenizer):
    """Empirical frequencies of the first token (from the prefill) and of the second (from the
    repeated cache) against softmax(logits / T) renormalised over the top-p nucleus, computed
    with a plain forward without cache."""
    policy = lora_policy(tiny_tokenizer)
    with torch.no_grad():  # peaked logits: a few tokens carry the mass, so counts are informative
        policy.model.get_output_embeddings().weight.mul_(8)
    _, cached = engines(tiny_tokenizer, policy)
    prompt = prompts(tiny_tokenizer, 1)[0]
    temperature, top_p, n = 0.7, 0.8, 6000
    out = cached.generate(
        [prompt],
        SamplingParams(
            num_samples=n, temperature=temperature, top_p=top_p, max_new_tokens=2, seed=3
        ),
    )

    def nucleus(context: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = policy.model(input_ids=torch.tensor([context])).logits[0, -1]
        probs = torch.softmax(logits.double() / temperature, -1)
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        kept = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        return kept / kept.sum()

    def check(samples: list[int], expected: torch.Tensor) -> None:
        counts = torch.bincount(torch.tensor(samples), minlength=len(expected)).double()
        assert counts[expected == 0].sum() == 0  # nothing outside the nucleus
        assert expected.count_nonzero() > 1  # a real distribution, not a forced token
        tv = 0.5 * (counts / counts.sum() - expected).abs().sum()
        assert tv < 3 * (expected.count_nonzero() / len(samples)) ** 0.5 / 2, tv

    check([o[0] for o in out], nucleus(prompt))
    first = max(set(o[0] for o in out), key=[o[0] for o in out].count)
    seconds = [o[1] for o in out if o[0] == first and len(o) > 1]
    check(seconds, nucleus(prompt + [first]))


def test_samples_are_a_pure_function_of_the_seed_and_leave_the_global_rng(tiny_tokenizer):
    policy = lora_policy(tiny_tokenizer, torch.float32)
    _, cached = engines(tiny_tokenizer, policy)
    ids = prompts(tiny_tokenizer)

    def sample(seed):
        return cached.generate(
            ids, SamplingParams(num_samples=3, temperature=1.0, max_new_tokens=10, seed=seed)
        )

    state = torch.get_rng_state()
    first = sample(7)
    assert torch.equal(torch.get_rng_state(), state)
    assert sample(7) == first
    assert sample(8) != first


def test_one_prefill_per_prompt_and_finished_rows_drop_out(tiny_tokenizer):
    policy = lora_policy(tiny_tokenizer, torch.float32)
    with torch.no_grad():  # make eos likely, so rows end at different steps
        head = policy.model.get_output_embeddings().weight
        head[tiny_tokenizer.eos_token_id] = head.std() * 3  # a constant row: a large logit
    _, cached = engines(tiny_tokenizer, policy)
    batch_sizes = []
    hook = policy.model.get_base_model().model.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape),
        with_kwargs=True,
    )
    ids = prompts(tiny_tokenizer)
    try:
        out = cached.generate(
            ids, SamplingParams(num_samples=4, temperature=1.0, max_new_tokens=12, seed=0)
        )
    finally:
        hook.remove()
    eos = tiny_tokenizer.eos_token_id
    assert all(eos not in o[:-1] for o in out)
    assert batch_sizes[0] == (len(ids), max(map(len, ids)))  # the prompts, once each
    alive = [sum(len(o) > step for o in out) for step in range(1, 12)]
    assert [s[0] for s in batch_sizes[1:]] == [a for a in alive if a]
    assert 0 < min(alive) < len(out)  # some rows did end early: the check above had work


def test_fsdp2_and_unsupported_options_are_refused_in_one_line(tiny_tokenizer):
    policy = lora_policy(tiny_tokenizer, torch.float32)
    _, cached = engines(tiny_tokenizer, policy)
    policy.sharded_units = [torch.nn.Linear(1, 1)]  # what `shard` leaves behind
    with pytest.raises(UserInputError, match=r"fsdp2.*engine: generate"):
        cached.generate([[1, 2]], SamplingParams(max_new_tokens=2))
    with pytest.raises(UserInputError, match=r"model\.rollout\.engine.*generate, cached, vllm"):
        RolloutOptions(engine="sglang")


def test_no_prompts_give_no_completions_in_both_engines(tiny_tokenizer):
    for engine in engines(tiny_tokenizer, lora_policy(tiny_tokenizer)):
        assert engine.generate([], SamplingParams(num_samples=4, max_new_tokens=8, seed=0)) == []
