"""Sample, decode and verify: the one pipeline that training and evaluation share.

`sample_and_verify` turns prompts into `Attempts` (n responses per prompt with their verdicts);
training adds teacher contexts to make `Rollout`s, evaluation turns the rewards into metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vpd_lightning.options import SamplingParams
from vpd_lightning.rollout.contexts import TeacherContext, TeacherContextBuilder
from vpd_lightning.rollout.engine import RolloutEngine
from vpd_lightning.rollout.prompts import render_prompt
from vpd_lightning.tasks import Record, Task, Verdict, verify_many


@dataclass
class Attempts:
    """`n` responses to each of `records`, prompt-major: response j of prompt i is at i * n + j."""

    records: list[Record]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    verdicts: list[Verdict]
    n: int
    sampler_logprobs: list[list[float]] | None = None
    """The engine's own log-prob of each sampled token, where it reports them (`vllm`)."""

    def groups(self) -> list[slice]:
        """The slice of each prompt's responses."""
        return [slice(i * self.n, (i + 1) * self.n) for i in range(len(self.records))]

    def rewards(self) -> torch.Tensor:
        """Rewards as a (prompts, n) float tensor."""
        return torch.tensor([float(v.reward) for v in self.verdicts], dtype=torch.float32).view(
            -1, self.n
        )

    def contexts(self, builder: TeacherContextBuilder) -> list[list[TeacherContext]]:
        """Each response's teacher context, per prompt (one batch for the whole builder call)."""
        groups = self.groups()
        return builder.build_batch(
            self.records, [self.texts[g] for g in groups], [self.verdicts[g] for g in groups]
        )


def sample_and_verify(
    engine: RolloutEngine,
    tokenizer,
    task: Task,
    records: Sequence[Record],
    prompt_ids: Sequence[Sequence[int]],
    params: SamplingParams,
    workers: int,
) -> Attempts:
    """Sample `params.num_samples` responses to each prompt, decode them and verify each against
    its record (the prompt may be a teacher's: the record is what the response is judged by).
    Only finished responses are verified; one stopped by the token cap gets `truncated_verdict`."""
    completions = engine.generate(prompt_ids, params)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    n = params.num_samples
    expanded = [r for r in records for _ in range(n)]
    stops = stop_ids(engine, tokenizer)
    finished = [i for i, c in enumerate(completions) if c and c[-1] in stops]
    judged = verify_many(
        task, [expanded[i] for i in finished], [texts[i] for i in finished], workers=workers
    )
    verdicts = [truncated_verdict(params.max_new_tokens)] * len(completions)
    for i, verdict in zip(finished, judged, strict=True):
        verdicts[i] = verdict
    logprobs = getattr(engine, "last_logprobs", None)
    return Attempts(
        list(records), [list(p) for p in prompt_ids], completions, texts, verdicts, n, logprobs
    )


def stop_ids(engine: RolloutEngine, tokenizer) -> set[int]:
    """The ids a finished response ends with: the tokenizer's eos, and the extra stop ids an
    engine declares as `eos_ids` (a generation config's)."""
    return {tokenizer.eos_token_id, *getattr(engine, "eos_ids", ())}


def truncated_verdict(max_new_tokens: int) -> Verdict:
    """A response cut off at the token cap never gave its final answer: reward 0, whatever a
    number in the middle of its reasoning says, and feedback that says so (not "your answer X")."""
    return Verdict(
        0.0,
        f"Your response was cut off at the limit of {max_new_tokens} tokens before it finished, "
        "so it gave no final answer. Reason more briefly and end with the final answer.",
        {"truncated": True},
    )


@dataclass
class Rollout:
    """One sampled response and everything both steps need about it (token ids only, no text)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    teacher_prompt_ids: list[int]
    reward: float
    has_context: bool
    finished: bool = True
    """Whether the response ended by itself (not at the token cap)."""
    sampler_logprobs: list[float] | None = None
    """The sampling engine's log-prob of each completion token, where it reports them."""


def to_rollouts(
    attempts: Attempts, contexts: Sequence[Sequence[TeacherContext | None]] | None
) -> list[Rollout]:
    """Rollouts from attempts and, per prompt and response, its teacher context (None: none)."""
    rollouts = []
    for i, group in enumerate(attempts.groups()):
        for j in range(group.start, group.stop):
            context = contexts[i][j - group.start] if contexts is not None else None
            has_context = context is not None and context.has_context
            rollouts.append(
                Rollout(
                    prompt_ids=attempts.prompt_ids[i],
                    completion_ids=attempts.completion_ids[j],
                    teacher_prompt_ids=context.prompt_ids
                    if has_context
                    else attempts.prompt_ids[i],
                    reward=float(attempts.verdicts[j].reward),
                    has_context=has_context,
                    finished=not attempts.verdicts[j].info.get("truncated", False),
                    sampler_logprobs=None
                    if attempts.sampler_logprobs is None
                    else attempts.sampler_logprobs[j],
                )
            )
    return rollouts


def answer_records(
    engine: RolloutEngine,
    tokenizer,
    task: Task,
    records: Sequence[Record],
    params: SamplingParams,
    workers: int,
) -> Attempts:
    """The student's verified answers to `records`, each shown as the chat prompt it renders to."""
    prompts = [render_prompt(tokenizer, r) for r in records]
    return sample_and_verify(engine, tokenizer, task, records, prompts, params, workers)


def collect_rollouts(
    engine: RolloutEngine,
    tokenizer,
    task: Task,
    records: Sequence[Record],
    params: SamplingParams,
    workers: int,
    builder: TeacherContextBuilder | None,
) -> list[Rollout]:
    """One training step's rollouts: sample and verify the student's responses to `records`,
    then give each its teacher context (`builder` None: no teacher, as in GRPO)."""
    attempts = answer_records(engine, tokenizer, task, records, params, workers)
    return to_rollouts(attempts, attempts.contexts(builder) if builder is not None else None)


def rollout_stats(rollouts: Sequence[Rollout], success_threshold: float) -> dict[str, float]:
    """Reward, success fraction, context coverage, mean response length and the fraction of
    responses cut off at the token cap, of a batch."""
    rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float64)
    return {
        "train/reward_mean": float(rewards.mean()),
        "train/success_fraction": float((rewards >= success_threshold).double().mean()),
        "train/context_coverage": sum(r.has_context for r in rollouts) / len(rollouts),
        "train/response_length": sum(len(r.completion_ids) for r in rollouts) / len(rollouts),
        "train/truncated_fraction": sum(not r.finished for r in rollouts) / len(rollouts),
    }
