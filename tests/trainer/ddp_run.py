"""Two CPU processes over gloo (Lightning's DDP launcher re-runs this file for rank 1).

Trains the tiny model for a few steps and writes each rank's parameter checksum, the prompts it
saw and its rollout count, so the test can check that ranks stayed in sync on different data.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning.pytorch.callbacks import Callback

from tests.trainer.helpers import lora, tiny_data, tiny_module, tiny_trainer
from vpd_lightning.options import EStepOptions


class Report(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.prompts: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.prompts.extend(str(r["prompt"]) for r in batch)

    def on_train_end(self, trainer, pl_module):
        checksum = sum(float(p.detach().double().sum()) for p in pl_module.parameters())
        report = {"checksum": checksum, "prompts": self.prompts, "step": trainer.global_step}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def main(out: Path, mode: str) -> None:
    torch.manual_seed(0)
    options = {"estep": EStepOptions(every=2)}
    if mode == "adapter":
        options.update(teacher_mode="adapter", lora=lora())
    module = tiny_module(**options)
    trainer = tiny_trainer(out, 2, devices=2, strategy="ddp", callbacks=[Report(out)])
    trainer.fit(module, datamodule=tiny_data())


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
