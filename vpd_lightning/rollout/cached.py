"""`cached`: a decoding loop of our own over the library's KV cache, doing no wasted work.

`generate` left-pads the G copies of every prompt, prefills each copy, recomputes an unmerged LoRA
in every layer at every token, and keeps computing rows that already ended. This loop instead
- prefills each distinct prompt once and repeats its cache G times (the G samples share it);
- drops a row from the batch and its cache the step it samples eos (finished rows cost nothing);
- samples from merged weights W + BA, rebuilt at every call from the live adapter into buffers of
  the engine's own (one copy of the adapted weights; nothing is written into the network);
- draws every random number from one generator seeded by `params.seed`, so the samples are a pure
  function of (weights, prompts, params) and resume stays exact.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import DynamicCache

from vpd_lightning.errors import UserInputError
from vpd_lightning.options import SamplingParams
from vpd_lightning.policy.roles import Policy


class MergedLora:
    """Sampling weights W + scaling * B @ A of every active LoRA layer, kept in buffers of their own.

    `swapped_in` rebuilds them from the live weights (one fused addmm per layer, no new memory
    after the first call) and points each layer at its buffer with its adapter path off; on exit
    the layers get their own parameters back, which were never written.
    """

    def __init__(self) -> None:
        self.buffers: dict[str, torch.nn.Parameter] = {}

    @staticmethod
    def _lora_layers(network: torch.nn.Module) -> list[tuple[str, torch.nn.Module, list[str]]]:
        from peft.tuners.lora import Linear, LoraLayer

        layers = []
        for name, module in network.named_modules():
            if not isinstance(module, LoraLayer) or module.disable_adapters or module.merged:
                continue
            active = [a for a in module.active_adapters if a in module.lora_A]
            if not active:
                continue
            plain = isinstance(module, Linear) and not module.fan_in_fan_out
            if not plain or any(module.use_dora.get(a) or module.lora_bias.get(a) for a in active):
                raise UserInputError(
                    f"model.rollout.engine = cached: LoRA layer {name} ({type(module).__name__}, "
                    "DoRA, bias or fan_in_fan_out) is not a plain linear adapter the sampler can "
                    "merge; use model.rollout.engine: generate"
                )
            layers.append((name, module, active))
        return layers

    @contextmanager
    def swapped_in(self, network: torch.nn.Module) -> Iterator[None]:
        layers = self._lora_layers(network)
        originals = []
        try:
            for name, module, active in layers:
                base = module.get_base_layer()
                weight = base.weight
                buffer = self.buffers.get(name)
                if buffer is None or buffer.shape != weight.shape or buffer.dtype != weight.dtype:
                    buffer = torch.nn.Parameter(torch.empty_like(weight), requires_grad=False)
                    self.buffers[name] = buffer
                source = weight.detach()
                for adapter in active:
                    a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
                    torch.addmm(source, b, a, alpha=module.scaling[adapter], out=buffer.data)
                    source = buffer.data
                originals.append((module, base, weight))
                base._parameters["weight"] = buffer
                module._disable_adapters = True
            yield
        finally:
            for module, base, weight in originals:
                base._parameters["weight"] = weight
                module._disable_adapters = False


def cache_keyword(network: torch.nn.Module) -> str:
    """The name the model's forward gives its KV cache: `cache` (transformers 5.2x, which still
    accepts `past_key_values` with a warning) or `past_key_values` (earlier releases, whose
    forwards would take `cache=` into **kwargs unread and sample without the prompt)."""
    base = network.get_base_model() if hasattr(network, "get_base_model") else network
    names = inspect.signature(type(base).forward).parameters
    return "cache" if "cache" in names else "past_key_values"


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row of `logits` (float32): argmax when greedy, else a draw from
    softmax(logits / temperature) restricted to the top-p nucleus, as `generate` samples."""
    if params.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass strictly before it already reaches top_p (the first stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class CachedEngine:
    """The `RolloutEngine` of the module docstring, on the live policy, in eval mode."""

    def __init__(self, model: torch.nn.Module, pad_id: int, eos_ids: Sequence[int]) -> None:
        self.model = model  # the Policy (its `.model` is the network) or a bare network
        self.pad_id = pad_id
        self.eos_ids = sorted(set(eos_ids))
        self.merged = MergedLora()

    def close(self) -> None:
        """Nothing to free: the engine runs on the live policy."""

    def _network(self) -> torch.nn.Module:
        if getattr(self.model, "sharded_units", None):
            raise UserInputError(
                "model.rollout.engine = cached under trainer.strategy = fsdp2: its per-token "
                "forwards would all-gather every layer at every token (FSDP2 gathers once only "
                "for `generate`); use model.rollout.engine: generate with fsdp2"
            )
        return self.model.model if isinstance(self.model, Policy) else self.model

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        if not prompts:
            return []
        network = self._network()
        device = next(network.parameters()).device
        generator = torch.Generator(device=device)
        seed = params.seed
        if seed is None:  # still reproducible under a global torch.manual_seed
            seed = int(torch.randint(0, 2**62, (), dtype=torch.long))
        generator.manual_seed(seed)
        was_training = network.training
        network.eval()
        try:
            with self.merged.swapped_in(network):
                return self._decode(self._forward(network), prompts, params, device, generator)
        finally:
            network.train(was_training)

    @staticmethod
    def _forward(network: torch.nn.Module) -> Callable[..., torch.Tensor]:
        """The network's forward, giving the last position's logits in float32, with the KV cache
        passed as `cache=`."""
        keyword = cache_keyword(network)

        def forward(cache: DynamicCache, **kwargs) -> torch.Tensor:
            kwargs[keyword] = cache
            return network(**kwargs, logits_to_keep=1, use_cache=True).logits[:, -1].float()

        return forward

    def _decode(
        self,
        forward: Callable[..., torch.Tensor],
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        device: torch.device,
        generator: torch.Generator,
    ) -> list[list[int]]:
        n = params.num_samples
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, ids in enumerate(prompts):  # left padding: every row's next token is at the end
            input_ids[i, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
            mask[i, width - len(ids) :] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        cache = DynamicCache()
        logits = forward(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
            cache=cache,
        )
        if n > 1:  # one prefill per prompt, then each sample gets its own copy of the cache
            cache.batch_repeat_interleave(n)
            mask = mask.repeat_interleave(n, dim=0)
            logits = logits.repeat_interleave(n, dim=0)
        rows = torch.arange(len(prompts) * n, device=device)  # output row of each batch row
        eos = torch.tensor(self.eos_ids, device=device)
        out: list[list[int]] = [[] for _ in range(len(prompts) * n)]
        for step in range(params.max_new_tokens):
            tokens = sample_tokens(logits, params, generator)
            for row, token in zip(rows.tolist(), tokens.tolist(), strict=True):
                out[row].append(token)
            if step == params.max_new_tokens - 1:
                break
            keep = ~torch.isin(tokens, eos)
            if not bool(keep.all()):
                if not bool(keep.any()):
                    break
                kept = keep.nonzero().squeeze(-1)
                cache.batch_select_indices(kept)
                rows, tokens, mask = rows[kept], tokens[kept], mask[kept]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=-1)
            logits = forward(
                input_ids=tokens[:, None],
                attention_mask=mask,
                position_ids=mask.sum(-1, keepdim=True) - 1,
                cache=cache,
            )
        return out
