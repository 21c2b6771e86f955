"""Builders shared by the trainer tests: a tiny VPD run on arithmetic, on the CPU."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch

from vpd_lightning.options import EStepOptions, LoraOptions, RolloutOptions, ValidationOptions
from vpd_lightning.tasks import ArithmeticTask
from vpd_lightning.trainer.data import VPDDataModule
from vpd_lightning.trainer.module import VPDModule


def tiny_task() -> ArithmeticTask:
    return ArithmeticTask(num_ops=2, max_operand=9, num_train=32, num_test=4, seed=0)


def tiny_module(**overrides) -> VPDModule:
    options = dict(
        model="builtin:tiny-random",
        rollout=RolloutOptions(num_generations=2, max_new_tokens=8),
        estep=EStepOptions(every=1),
        validation=ValidationOptions(num_samples=2, pass_k=[1, 2], temperature=1.0),
        micro_batch_size=3,
        max_context_tokens=32,
        student_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
        teacher_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
        verify_workers=1,
        task=tiny_task(),
    )
    options.update(overrides)
    if options.get("method", "vpd") != "vpd":
        options.pop("teacher_optimizer", None)
    return VPDModule(**options)


def tiny_data(prompts_per_step: int = 2) -> VPDDataModule:
    return VPDDataModule(
        tiny_task(), prompts_per_step=prompts_per_step, val_size=2, val_batch_size=2
    )


def tiny_trainer(tmp_path: Path, max_steps: int, **overrides) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    options.update(overrides)
    return pl.Trainer(**options)


def lora() -> LoraOptions:
    return LoraOptions(r=4, alpha=8)


def snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def changed(before: list[torch.Tensor], params) -> bool:
    return any(not torch.equal(b, p.detach()) for b, p in zip(before, params, strict=True))


def fit_run(tmp_path: Path, module_options: dict, steps: int, ckpt_in=None, ckpt_out=None):
    """A tiny run of `steps` steps (from `ckpt_in` if given, saved to `ckpt_out` if given), with
    the same LoRA initialisation in every run, as the CLI's seed gives."""
    pl.seed_everything(0)
    module = tiny_module(**module_options)
    trainer = tiny_trainer(tmp_path, steps)
    trainer.fit(module, datamodule=tiny_data(), ckpt_path=ckpt_in)
    if ckpt_out is not None:
        trainer.save_checkpoint(ckpt_out)
    return module
