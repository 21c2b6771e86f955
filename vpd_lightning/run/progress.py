"""One plain line per logged step when no terminal is attached (a scheduler's log, `| tee`).

A live progress bar redraws itself in place; written to a file it shows nothing until the end.
This prints, on process 0, the step, the reward, the losses, seconds per step and the time left.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

SHOWN = {
    "reward": "train/reward_mean",
    "mstep/loss": "mstep/loss",
    "estep/loss": "estep/loss",
}


class BatchLog(Callback):
    """Print a line per logged training step when `stream` is not a terminal (or `always`)."""

    def __init__(self, stream: TextIO | None = None, always: bool = False) -> None:
        self.stream = stream
        self.always = always
        self._start = 0.0
        self._start_step = 0

    def _out(self) -> TextIO:
        return self.stream or sys.stdout

    def enabled(self) -> bool:
        out = self._out()
        return self.always or not (hasattr(out, "isatty") and out.isatty())

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()
        self._start_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        step = trainer.global_step
        last = step >= trainer.max_steps > 0
        if not trainer.is_global_zero or not self.enabled():
            return
        if step % max(trainer.log_every_n_steps, 1) and not last:
            return
        print(step_line(step, trainer.max_steps, outputs, self._rate(step)), file=self._out())
        self._out().flush()

    def _rate(self, step: int) -> float | None:
        done = step - self._start_step
        return (time.perf_counter() - self._start) / done if done > 0 else None


def step_line(step: int, max_steps: int, stats: object, seconds_per_step: float | None) -> str:
    """`step 3/6  reward 0.250  mstep/loss 0.0123  estep/loss 0.693  1.84 s/step  left 0:00:06`."""
    stats = stats if isinstance(stats, dict) else {}
    total = f"/{max_steps}" if max_steps > 0 else ""
    parts = [f"step {step}{total}"]
    for label, key in SHOWN.items():
        if key in stats:
            parts.append(f"{label} {float(stats[key]):.4g}")
    if seconds_per_step is not None:
        parts.append(f"{seconds_per_step:.2f} s/step")
        if max_steps > 0:
            parts.append(f"left {_clock(seconds_per_step * max(max_steps - step, 0))}")
    return "  ".join(parts)


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
