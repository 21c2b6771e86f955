"""Tiny-model runs on one process or on two CPU processes over gloo, for test_distributed.py.

`python tests/trainer/ddp_run.py OUT STRATEGY [CASE ...]` (Lightning's launcher re-runs this file
for rank 1) trains each case in turn in the same two processes; `run_case` with one device is the
in-process reference. Process 0 writes OUT/<case>.json (each step's logged metrics, delta, beta,
the prompts each process saw), OUT/<case>.pt and OUT/<case>-initial.pt (the network's full weights
after and before training).
With STRATEGY fsdp2, `resume_case` also checks a sharded checkpoint: 1 step, save, resume to 2.

The rollouts come from `ScriptedEngine`, whose responses are a pure function of the prompt: two
processes on B prompts each per step then learn from exactly the rollouts that one process on the
same 2B prompts does (the prompt order of (step, rank) puts rank 0's B prompts, then rank 1's, at
the place of the 2B), so every difference left is in how the step combines processes.
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.trainer.helpers import lora, tiny_data, tiny_module, tiny_trainer
from vpd_lightning.options import DistillOptions, EStepOptions, SdpoOptions
from vpd_lightning.rollout import render_prompt
from vpd_lightning.rollout.engine import SamplingParams
from vpd_lightning.trainer.distributed import end_process_group, gather_objects

PROMPTS_PER_PROCESS = 2
STEPS = 2
SHARP = DistillOptions(temperature=0.05)  # a random model's KLs are tiny at temperature 1
CASES = {
    # full fine-tuning, shared teacher, beta adapted toward a target KL: the E-step at step 2
    # uses both steps' rollouts, so delta, beta and the label counts span processes and steps
    "vpd-shared": dict(estep=EStepOptions(every=2, target_kl=0.01), distill=SHARP),
    "vpd-adapter-lora": dict(
        teacher_mode="adapter", lora=lora(), estep=EStepOptions(every=1), distill=SHARP
    ),
    # the EMA snapshot holds the embeddings and head, which FSDP2 keeps in the root unit
    "sdpo-ema": dict(method="sdpo", sdpo=SdpoOptions(teacher="ema", ema_decay=0.5), distill=SHARP),
    "opsd-lora": dict(method="opsd", feedback_source="reference", lora=lora(), distill=SHARP),
    "grpo": dict(method="grpo"),
    # two updates per batch: rollout-time anchors (trust region), and the fixed initial prior
    "vpd-fixed-prior-trust-region": dict(
        estep=EStepOptions(every=1, prior="initial"),
        updates_per_batch=2,
        distill=DistillOptions(temperature=0.05, trust_region_coef=0.5),
    ),
}


class ScriptedEngine:
    """Responses determined by the prompt alone: right or wrong answers after a few filler
    characters, so processes hold different token and success counts."""

    def __init__(self, tokenizer, records: list[dict]) -> None:
        self.tokenizer = tokenizer
        self.answers = {tuple(render_prompt(tokenizer, r)): r["answer"] for r in records}

    def generate(self, prompts, params: SamplingParams) -> list[list[int]]:
        out = []
        for prompt in prompts:
            answer = self.answers.get(tuple(prompt), 0)
            for j in range(params.num_samples):
                draw = zlib.crc32(repr((list(prompt), j)).encode())
                wrong = int(draw % 3 == 0)  # about a third wrong, unevenly across prompts
                text = "x" * (draw % 7) + f"<answer>{answer + wrong}</answer>"
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                out.append([*ids, self.tokenizer.eos_token_id])
        return out


class Capture(Logger):
    """Keeps the logged step metrics in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int) -> None:
        self.rows.append({"step": step, **{k: float(v) for k, v in metrics.items()}})

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


class Prompts(Callback):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.extend(str(r["prompt"]) for r in batch)


def build(case: str, world: int):
    pl.seed_everything(0)  # the same LoRA initialisation on every process and in the reference
    optimizer = lambda p: torch.optim.SGD(p, lr=0.05)  # noqa: E731 (linear in the gradient)
    options = dict(student_optimizer=optimizer, teacher_optimizer=optimizer, **CASES[case])
    module = tiny_module(**options)
    data = tiny_data(PROMPTS_PER_PROCESS * (2 // world))
    module.engine = ScriptedEngine(module.tokenizer, data.train_records())
    return module, data


def full_weights(module) -> dict[str, torch.Tensor]:
    """The network's full weights, on every process (shards are gathered under FSDP2)."""
    return {
        name: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
        for name, v in module.policy.model.state_dict().items()
    }


def fit(module, data, out: Path, strategy: str, devices: int, steps: int, ckpt_path=None):
    capture, prompts = Capture(), Prompts()
    trainer = tiny_trainer(
        out,
        steps,
        devices=devices,
        strategy=strategy,
        logger=[capture],
        log_every_n_steps=1,
        callbacks=[prompts],
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer, capture, gather_objects(prompts.seen)


def run_case(out: Path, case: str, strategy: str = "auto", devices: int = 1) -> None:
    module, data = build(case, devices)
    initial = full_weights(module)
    trainer, capture, prompts = fit(module, data, out, strategy, devices, STEPS)
    weights = full_weights(module)
    if trainer.is_global_zero:
        report = {
            "steps": capture.rows,
            "delta": module.estep.delta if module.estep else 0.0,
            "beta": module.estep.beta if module.estep else 0.0,
            "prompts": prompts,
            "global_step": trainer.global_step,
            "sharded": bool(module.policy.sharded_units),
        }
        (out / f"{case}.json").write_text(json.dumps(report))
        torch.save(weights, out / f"{case}.pt")
        torch.save(initial, out / f"{case}-initial.pt")


def resume_case(out: Path, case: str, strategy: str, devices: int) -> None:
    """1 step, a sharded checkpoint, resumed to 2 steps; the straight run is `run_case`'s. Also
    records the logits of the 1-step policy on a fixed input, for the export test."""
    module, data = build(case, devices)
    trainer, _, _ = fit(module, data, out / "first", strategy, devices, 1)
    checkpoint = out / f"{case}-step1.ckpt"
    trainer.save_checkpoint(checkpoint)
    ids = torch.tensor([list(range(5, 30))])
    logits = module.policy.run(lambda p: p.model(input_ids=ids).logits.detach().clone())
    module, data = build(case, devices)
    trainer, _, _ = fit(module, data, out / "second", strategy, devices, STEPS, checkpoint)
    weights = full_weights(module)
    if trainer.is_global_zero:
        torch.save(weights, out / f"{case}-resumed.pt")
        torch.save({"input_ids": ids, "logits": logits}, out / f"{case}-step1-logits.pt")


def main(out: Path, strategy: str, cases: list[str]) -> None:
    for case in cases:
        run_case(out, case, strategy, devices=2)
    if strategy == "fsdp2":
        resume_case(out, "vpd-shared", strategy, devices=2)
    end_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:] or list(CASES))
