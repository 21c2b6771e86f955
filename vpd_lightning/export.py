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
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from vpd_lightning.errors import UserInputError
from vpd_lightning.options import LoraOptions
from vpd_lightning.policy.models import (
    STUDENT_ADAPTER,
    TEACHER_ADAPTER,
    add_lora,
    load_causal_lm,
    load_tokenizer,
    torch_dtype,
)
from vpd_lightning.run.checks import load_checkpoint_file, weight_differences
from vpd_lightning.trainer.checkpoint_files import (
    check_size,
    load_sharded_weights,
    parameter_bytes,
    read_archive,
    size_budget,
    verify_checksum,
)

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
    """Write the checkpoint's student policy to `out_dir` (see the module docstring), whole or
    not at all: it is written next to `out_dir` and renamed into place."""
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
    network = load_causal_lm(hparams["model"], torch_dtype(hparams.get("dtype", "float32")))
    if lora:
        adapters = (STUDENT_ADAPTER,)
        if hparams.get("teacher_mode") == "adapter":
            adapters = (STUDENT_ADAPTER, TEACHER_ADAPTER)
        network = add_lora(network, LoraOptions(**lora), adapters)
    load_policy_weights(network, checkpoint)
    if lora and not adapter_only:
        network = network.merge_and_unload(adapter_names=[STUDENT_ADAPTER])
    write_folder_atomically(out, lambda folder: _write(network, hparams, folder, adapter_only))
    return out


def _write(network: torch.nn.Module, hparams: dict, folder: Path, adapter_only: bool) -> None:
    if adapter_only:
        _save_student_adapter(network, folder)
    else:
        network.save_pretrained(folder)
    load_tokenizer(hparams["model"]).save_pretrained(folder)


def write_folder_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """Run `write(folder)` into a hidden folder next to `out`, then rename it onto `out`; on any
    failure the hidden folder is removed and `out` is left as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(temp, ignore_errors=True)
    try:
        temp.mkdir()
        write(temp)
        os.replace(temp, out)  # onto a missing or empty folder
    except OSError as error:
        shutil.rmtree(temp, ignore_errors=True)
        raise UserInputError(
            f"out_dir {out}: cannot be written ({error.strerror or error}); nothing was left "
            "there: free space or give a writable folder, and run export again"
        ) from None
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def load_policy_weights(network: torch.nn.Module, checkpoint: str | Path) -> None:
    """Load the checkpoint's policy weights into `network`, after holding the checkpoint to the
    size budget of `network` and verifying its checksum; a missing, extra or reshaped weight is
    one line naming it."""
    check_size(checkpoint, size_budget(parameter_bytes(network)))
    state = policy_state_dict(checkpoint)
    problem = weight_differences(
        {k: tuple(v.shape) for k, v in network.state_dict().items()},
        {k: tuple(v.shape) for k, v in state.items()},
    )
    if problem:
        raise UserInputError(
            f"ckpt_path {checkpoint}: {problem} for the model {type(network).__name__} it names;"
            " it was not written for this model"
        )
    network.load_state_dict(state, strict=True)


def policy_state_dict(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The network's weights from a checkpoint file (checksum verified) or a sharded folder
    (manifest verified), keys as in the network; nothing in either is run (`checkpoint_files`)."""
    path = Path(checkpoint)
    if path.is_dir():
        state = load_sharded_weights(path)
    else:
        content = read_archive(path)
        verify_checksum(content, path)
        state = content["state_dict"]
    return {k[len(POLICY_PREFIX) :]: v for k, v in state.items() if k.startswith(POLICY_PREFIX)}


def _save_student_adapter(network: torch.nn.Module, out: Path) -> None:
    """PEFT saves a non-default adapter name into a subfolder; write the student's as the
    folder's own (default) adapter instead."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(network, adapter_name=STUDENT_ADAPTER)
    save_file({k: v.contiguous() for k, v in state.items()}, out / "adapter_model.safetensors")
    network.peft_config[STUDENT_ADAPTER].save_pretrained(out)
