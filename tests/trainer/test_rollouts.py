"""The sample-and-verify pipeline that training and evaluation share, on the tiny model."""

from __future__ import annotations

import torch

from vpd_lightning.policy.tiny import build_tiny_model
from vpd_lightning.rollout import TeacherContextBuilder, render_prompt
from vpd_lightning.rollout.engine import HFGenerateEngine, SamplingParams
from vpd_lightning.rollout.sampling import (
    rollout_stats,
    sample_and_verify,
    to_rollouts,
    truncated_verdict,
)

from .helpers import tiny_task


def attempts_for(tiny_tokenizer, n: int = 3, seed: int = 5):
    task = tiny_task()
    records = task.records("train")[:2]
    model = build_tiny_model(len(tiny_tokenizer))
    engine = HFGenerateEngine(model, tiny_tokenizer.pad_token_id, [tiny_tokenizer.eos_token_id])
    prompts = [render_prompt(tiny_tokenizer, r) for r in records]
    params = SamplingParams(num_samples=n, temperature=1.0, max_new_tokens=6, seed=seed)
    return (
        task,
        records,
        sample_and_verify(engine, tiny_tokenizer, task, records, prompts, params, 1),
    )


def test_attempts_are_prompt_major_decoded_and_verified(tiny_tokenizer):
    task, records, attempts = attempts_for(tiny_tokenizer)
    assert len(attempts.texts) == len(attempts.verdicts) == 6
    assert attempts.groups() == [slice(0, 3), slice(3, 6)]
    for i, group in enumerate(attempts.groups()):
        for j in range(group.start, group.stop):
            assert attempts.texts[j] == tiny_tokenizer.decode(
                attempts.completion_ids[j], skip_special_tokens=True
            )
            finished = attempts.completion_ids[j][-1] == tiny_tokenizer.eos_token_id
            expected = (
                task.verify(records[i], attempts.texts[j]) if finished else truncated_verdict(6)
            )
            assert attempts.verdicts[j] == expected
    assert attempts.rewards().shape == (2, 3)


class ScriptedEngine:
    """Returns the given completions in order (one per prompt and sample)."""

    def __init__(self, completions: list[list[int]]) -> None:
        self.completions = completions

    def generate(self, prompts, params) -> list[list[int]]:
        return [list(c) for c in self.completions]


def test_a_response_cut_off_at_the_token_cap_gets_no_reward_and_says_so(tiny_tokenizer):
    """Issue 23: a truncated response's number mid-reasoning is not its answer. The same correct
    text is rewarded when the response ended, and not when the cap stopped it."""
    task = tiny_task()
    record = task.records("train")[0]
    correct = tiny_tokenizer.encode(f"<answer>{record['answer']}</answer>")
    eos = tiny_tokenizer.eos_token_id
    engine = ScriptedEngine([correct + [eos], correct])
    prompts = [render_prompt(tiny_tokenizer, record)]
    params = SamplingParams(num_samples=2, max_new_tokens=len(correct))
    attempts = sample_and_verify(engine, tiny_tokenizer, task, [record], prompts, params, 1)
    ended, cut = attempts.verdicts
    assert ended.reward == 1.0 and not ended.info.get("truncated")
    assert cut.reward == 0.0 and cut.info["truncated"]
    assert f"cut off at the limit of {len(correct)} tokens" in cut.feedback
    assert "Your answer" not in cut.feedback
    rollouts = to_rollouts(attempts, None)
    assert [r.finished for r in rollouts] == [True, False]
    assert rollout_stats(rollouts, 1.0)["train/truncated_fraction"] == 0.5


def test_an_engines_extra_stop_ids_end_a_response(tiny_tokenizer):
    """A generation config's extra end-of-turn id counts as finished, when the engine says so."""
    task = tiny_task()
    record = task.records("train")[0]
    correct = tiny_tokenizer.encode(f"<answer>{record['answer']}</answer>")
    end_of_turn = 7
    engine = ScriptedEngine([correct + [end_of_turn]])
    engine.eos_ids = {end_of_turn}
    prompts = [render_prompt(tiny_tokenizer, record)]
    params = SamplingParams(num_samples=1, max_new_tokens=64)
    (verdict,) = sample_and_verify(
        engine, tiny_tokenizer, task, [record], prompts, params, 1
    ).verdicts
    assert verdict.reward == 1.0


def test_sampling_is_a_pure_function_of_the_seed(tiny_tokenizer):
    first = attempts_for(tiny_tokenizer, seed=11)[2]
    again = attempts_for(tiny_tokenizer, seed=11)[2]
    other = attempts_for(tiny_tokenizer, seed=12)[2]
    assert first.completion_ids == again.completion_ids
    assert first.completion_ids != other.completion_ids


def test_rollouts_pair_each_response_with_its_teacher_context(tiny_tokenizer):
    _, records, attempts = attempts_for(tiny_tokenizer)
    builder = TeacherContextBuilder(tiny_tokenizer, source="verifier", max_context_tokens=32)
    groups = attempts.groups()
    contexts = builder.build_batch(
        records, [attempts.texts[g] for g in groups], [attempts.verdicts[g] for g in groups]
    )
    rollouts = to_rollouts(attempts, contexts)
    assert [r.completion_ids for r in rollouts] == attempts.completion_ids
    assert all(r.has_context and r.teacher_prompt_ids != r.prompt_ids for r in rollouts)
    assert rollouts[4].teacher_prompt_ids == contexts[1][1].prompt_ids
    bare = to_rollouts(attempts, None)  # GRPO: no teacher
    assert all(not r.has_context and r.teacher_prompt_ids == r.prompt_ids for r in bare)


def test_rollout_stats_use_the_success_threshold(tiny_tokenizer):
    _, _, attempts = attempts_for(tiny_tokenizer)
    rollouts = to_rollouts(attempts, None)
    rewards = [0.0, 0.5, 1.0, 1.0, 0.25, 0.0]
    for rollout, reward in zip(rollouts, rewards, strict=True):
        rollout.reward = reward
    assert rollout_stats(rollouts, 1.0)["train/success_fraction"] == 2 / 6
    assert rollout_stats(rollouts, 0.5)["train/success_fraction"] == 3 / 6
    stats = rollout_stats(rollouts, 1.0)
    assert stats["train/reward_mean"] == sum(rewards) / 6
    lengths = torch.tensor([len(r.completion_ids) for r in rollouts], dtype=torch.float64)
    assert stats["train/response_length"] == lengths.mean().item()
