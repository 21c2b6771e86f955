"""Sampling responses from the student, behind a small interface so faster engines can plug in."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from vpd_lightning.options import SamplingParams


class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        """Completion ids for each prompt, `num_samples` in a row per prompt (prompt-major).

        A completion ends with the eos token when the model stopped, and never holds padding.
        An engine with log-probs of its own (`vllm`) also keeps the call's sampled-token
        log-probs as `last_logprobs`, one list per completion.
        """
        ...

    def close(self) -> None:
        """Free what the engine holds beside the policy (an in-process vLLM's KV cache, weights
        and process groups); before the process group ends, since vLLM's own exit-time shutdown
        fails once the default group is gone."""
        ...


class HFGenerateEngine:
    """`transformers` `generate` on the live policy, in eval mode and without gradients."""

    def __init__(self, model: torch.nn.Module, pad_id: int, eos_ids: Sequence[int]) -> None:
        self.model = model
        self.pad_id = pad_id
        self.eos_ids = set(eos_ids)

    def close(self) -> None:
        """Nothing to free: the engine runs on the live policy."""

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        if not prompts:
            return []
        device = next(self.model.parameters()).device
        expanded = [list(p) for p in prompts for _ in range(params.num_samples)]
        width = max(len(p) for p in expanded)
        input_ids = torch.full((len(expanded), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, ids in enumerate(expanded):  # left padding: generation continues every row's end
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            attention_mask[i, width - len(ids) :] = 1
        greedy = params.temperature <= 0
        kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            do_sample=not greedy,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids),
        )
        if not greedy:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                out = self.model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    **kwargs,
                )
        finally:
            self.model.train(was_training)
        return [self._trim(row) for row in out[:, width:].tolist()]

    def _trim(self, row: list[int]) -> list[int]:
        for i, token in enumerate(row):
            if token in self.eos_ids:
                return row[: i + 1]
        return row  # stopped by max_new_tokens: every token is a real sample


def make_engine(
    name: str,
    model: torch.nn.Module,
    pad_id: int,
    eos_ids: Sequence[int],
    sampler_dtype: str | None = None,
) -> RolloutEngine:
    """The engine `model.rollout.engine` names, on the live `model` (the Policy)."""
    if name == "vllm":
        from vpd_lightning.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model, pad_id, eos_ids, sampler_dtype)
    if name == "cached":
        from vpd_lightning.rollout.cached import CachedEngine

        return CachedEngine(model, pad_id, eos_ids)
    return HFGenerateEngine(model, pad_id, eos_ids)
