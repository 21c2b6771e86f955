"""`python -m vpd_lightning export CKPT OUT_DIR`: a trained policy as a Hugging Face model folder.

CKPT is a checkpoint file (one device or DDP) or a sharded FSDP2 checkpoint folder, whose shards
are assembled here in one process (`torch.distributed.checkpoint`, no process group; the weights
only, not the optimizer states). The policy is rebuilt as it was trained (model, dtype, LoRA
adapters, from the checkpoint's hyper-parameters), and OUT_DIR gets:
- by default, the student with its LoRA adapter merged into the base weights: a plain
  `transformers` folder that `AutoModelForCausalLM.from_pretrained` loads without peft;
- with `--adapter-only`, the student's LoRA adapter alone (`adapter_config.json` and
  `adapter_model.safetensors`), for `peft.PeftModel.from_pretrained(base_model, OUT_DIR)`.
The tokenizer is saved in both cases. The student is the trained policy; a VPD teacher adapter
(`teacher_mode: adapter`) is training machinery and is not exported.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vpd_lightning.errors import UserInputError
from vpd_lightning.options import DTYPE_NAMES, LoraOptions
from vpd_lightning.policy.models import (
    STUDENT_ADAPTER,
    TEACHER_ADAPTER,
    add_lora,
    load_causal_lm,
    load_tokenizer,
)
from vpd_lightning.trainer.checkpoint import load_checkpoint_file

POLICY_PREFIX = "policy.model."  # the network's keys in VPDModule's state dict


def export_main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vpd_lightning export",
        description="Write a checkpoint's policy as a Hugging Face model folder.",
    )
    parser.add_argument("checkpoint", help="a .ckpt file, or a sharded (fsdp2) checkpoint folder")
    parser.add_argument("out_dir", help="the folder to write (must not exist, or be empty)")
    parser.add_argument(
        "--adapter-only",
        action="store_true",
        help="write the student's LoRA adapter alone instead of the merged model",
    )
    options = parser.parse_args(args)
    out = export(options.checkpoint, options.out_dir, adapter_only=options.adapter_only)
    kind = "LoRA adapter" if options.adapter_only else "model"
    print(f"vpd_lightning: exported the {kind} to {out}")


def export(checkpoint: str | Path, out_dir: str | Path, adapter_only: bool = False) -> Path:
    """Write the checkpoint's student policy to `out_dir` (see the module docstring)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserInputError(f"out_dir {out}: exists and is not an empty folder; give a new one")
    hparams = load_checkpoint_file(checkpoint).get("hyper_parameters", {})
    lora = hparams.get("lora")
    if adapter_only and not lora:
        raise UserInputError(
            f"--adapter-only: {checkpoint} was trained without LoRA (model.lora: null); export "
            "the full model instead (drop --adapter-only)"
        )
    network = load_causal_lm(hparams["model"], _dtype(hparams.get("dtype", "float32")))
    if lora:
        adapters = (STUDENT_ADAPTER,)
        if hparams.get("teacher_mode") == "adapter":
            adapters = (STUDENT_ADAPTER, TEACHER_ADAPTER)
        network = add_lora(network, LoraOptions(**lora), adapters)
    network.load_state_dict(policy_state_dict(checkpoint), strict=True)
    out.mkdir(parents=True, exist_ok=True)
    if adapter_only:
        _save_student_adapter(network, out)
    else:
        if lora:
            network = network.merge_and_unload(adapter_names=[STUDENT_ADAPTER])
        network.save_pretrained(out)
    load_tokenizer(hparams["model"]).save_pretrained(out)
    return out


def policy_state_dict(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The network's weights from a checkpoint file or a sharded folder, keys as in the network."""
    path = Path(checkpoint)
    if path.is_dir():
        state = _sharded_weights(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k[len(POLICY_PREFIX) :]: v for k, v in state.items() if k.startswith(POLICY_PREFIX)}


def _sharded_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The model weights of a sharded checkpoint, assembled in this process."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    loaded: dict = {}
    _load_state_dict(
        loaded,
        storage_reader=FileSystemReader(folder),
        planner=_EmptyStateDictLoadPlanner(keys={"state_dict"}),
        no_dist=True,
    )
    return loaded["state_dict"]


def _save_student_adapter(network: torch.nn.Module, out: Path) -> None:
    """PEFT saves a non-default adapter name into a subfolder; write the student's as the
    folder's own (default) adapter instead."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(network, adapter_name=STUDENT_ADAPTER)
    save_file({k: v.contiguous() for k, v in state.items()}, out / "adapter_model.safetensors")
    network.peft_config[STUDENT_ADAPTER].save_pretrained(out)


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPE_NAMES:
        raise UserInputError(f"model.dtype = {name!r} in the checkpoint: not one of {DTYPE_NAMES}")
    return getattr(torch, name)
