"""`python -m vpd_lightning {fit,validate,test} --config configs/X.yaml`: a LightningCLI app.

Besides LightningCLI's own behaviour (unknown keys are errors, `--print_config`, the resolved
config saved next to the logs), `fit` evaluates before and after training, draws the learning
curves and ends by printing where the logs, curves, checkpoints and config went.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from jsonargparse import lazy_instance
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

from vpd_lightning.data import VPDDataModule
from vpd_lightning.module import VPDModule
from vpd_lightning.plot import plot_run

TRAINER_DEFAULTS = {
    "logger": lazy_instance(CSVLogger, save_dir="runs", name="vpd"),
    "max_steps": 100,
    "val_check_interval": 50,
    "check_val_every_n_epoch": None,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,
}


# Lightning warns that step-interval checkpoints hold the weights after the step's updates; that
# is what resuming needs here (one step = rollouts + all of its updates), as the resume test shows.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


class VPDCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.task", "model.task", apply_on="instantiate")
        parser.add_argument(
            "--evaluate_before_after",
            type=bool,
            default=True,
            help="fit: validate before and after training and print both accuracies",
        )

    def before_fit(self) -> None:
        self._before = None
        if self._wants_before_after():
            self._before = self._validate()

    def after_fit(self) -> None:
        after = None
        if self._wants_before_after():
            validated_now = self.model.last_validated_step == self.trainer.global_step
            after = self._last_validation() if validated_now else self._validate()
        if self.trainer.is_global_zero:
            print(self._summary(self._before, after, self._plot()))

    def _plot(self) -> Path | None:
        """Learning curves from the CSV log, when the run has one."""
        logger = self.trainer.logger
        if logger is None or not (Path(logger.log_dir) / "metrics.csv").exists():
            return None
        logger.save()
        return plot_run(logger.log_dir)

    def _wants_before_after(self) -> bool:
        config = self.config[self.subcommand]
        return bool(config.get("evaluate_before_after")) and not config.get("ckpt_path")

    def _validate(self) -> dict[str, float]:
        results = self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        return {k: float(v) for k, v in (results[0] if results else {}).items()}

    def _last_validation(self) -> dict[str, float]:
        """The metrics of the validation that fit itself ran at the final step."""
        metrics = self.trainer.callback_metrics
        return {k: float(v) for k, v in metrics.items() if k.startswith("val/")}

    def _summary(self, before: dict | None, after: dict | None, curves: Path | None) -> str:
        trainer = self.trainer
        log_dir = Path(trainer.log_dir) if trainer.log_dir else None
        checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "") or getattr(
            trainer.checkpoint_callback, "best_model_path", ""
        )
        lines = ["", "vpd_lightning: training finished"]
        if log_dir is not None:
            lines.append(f"  logs:       {log_dir}")
            lines.append(f"  config:     {log_dir / 'config.yaml'}")
        lines.append(f"  checkpoint: {checkpoint or '(none saved)'}")
        if curves is not None:
            lines.append(f"  curves:     {curves}")
        lines.append(f"  steps:      {trainer.global_step}")
        for key in sorted((before or {}) | (after or {})):
            b = (before or {}).get(key)
            a = (after or {}).get(key)
            fmt = lambda x: "   -  " if x is None else f"{x:.3f}"  # noqa: E731
            lines.append(f"  {key:<22} before {fmt(b)}  after {fmt(a)}")
        return "\n".join(lines)


def main(args: list[str] | None = None) -> VPDCLI:
    return VPDCLI(
        VPDModule,
        VPDDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
