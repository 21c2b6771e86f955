"""`python -m vpd_lightning {fit,validate,test} --config configs/X.yaml`: a LightningCLI app.

Besides LightningCLI's own behaviour (unknown keys are errors, `--print_config`, the resolved
config saved next to the logs), `fit` evaluates before and after training, draws the learning
curves and ends by printing where the logs, curves, checkpoints and config went (process 0 only;
every process takes part in the collectives that find them). `--trainer.strategy` takes `ddp` and
`fsdp2` (`strategies.py`). `python -m vpd_lightning export CKPT OUT_DIR` writes a Hugging Face
model folder from a checkpoint (`export.py`); `seal CKPT` adds the checksum that loading verifies
to a checkpoint written without one (`seal.py`); `predict` samples a task split to JSONL (`predict.py`).

Every run writes its checkpoints atomically (`trainer/checkpoint_io.py`), saves and exits non-zero
on SIGTERM or SIGINT (`run/preemption.py`), and prints one line per logged step when no
terminal is attached (`run/progress.py`). Every check a run meets is in `run/checks.py`.

Bad input (options, config files, data files, model ids, checkpoints) is refused before the model
loads, with one line on stderr and exit status 2; `VPD_TRACEBACK=1` shows the traceback instead.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path
from typing import NoReturn

from jsonargparse import lazy_instance, set_parsing_settings
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vpd_lightning.errors import UserInputError
from vpd_lightning.predict import PredictOptions, predict
from vpd_lightning.rollout.prompts import render_prompt
from vpd_lightning.run.checks import (
    check_checkpoint,
    check_checkpoint_fits,
    check_checkpoint_strategy,
    check_config_files,
    check_data_options,
    check_learning_rates,
    check_lengths_fit,
    check_output_folders,
    check_predict_options,
    check_prompts_fit,
    check_trainer_flags,
    check_trainer_values,
    model_positions,
    positions_of,
    resolve_last_checkpoint,
)
from vpd_lightning.run.config_files import bound_jsonargparse_yaml
from vpd_lightning.run.plot import plot_run
from vpd_lightning.run.preemption import Preempted, PreemptionCheckpoint
from vpd_lightning.run.progress import BatchLog
from vpd_lightning.trainer.checkpoint_io import AtomicCheckpointIO
from vpd_lightning.trainer.data import VPDDataModule
from vpd_lightning.trainer.distributed import end_process_group
from vpd_lightning.trainer.module import VPDModule
from vpd_lightning.trainer.stepping import NonFiniteLossError

TRAINER_DEFAULTS = {
    "logger": lazy_instance(CSVLogger, save_dir="runs", name="vpd"),
    "max_steps": 100,
    "val_check_interval": 50,
    "check_val_every_n_epoch": None,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,
}
TRACEBACK_VARIABLE = "VPD_TRACEBACK"
EPILOG = (
    "other commands: `export CKPT OUT_DIR [--adapter-only]` writes a checkpoint as a Hugging "
    "Face model folder; `seal CKPT` adds the checksum that loading verifies to a checkpoint "
    "written without one; `predict --config X [--ckpt_path CKPT] [--sample.out F.jsonl] "
    "[--sample.split test]` samples a task split, one JSONL line per attempt"
)

# `fit --help` shows each option group's attribute docstrings (vpd_lightning/options.py).
set_parsing_settings(docstring_parse_attribute_docstrings=True)
bound_jsonargparse_yaml()
# Lightning warns that step-interval checkpoints hold the weights after the step's updates; that
# is what resuming needs here (one step = rollouts + all of its updates), as the resume test shows.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


class ParserError(UserInputError):
    """A config or command-line error found by the argument parser."""


class OneLineErrorParser(LightningArgumentParser):
    """Raises parse errors as `ParserError` with one line, instead of printing usage and exiting."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        raise ParserError(summarize_parser_error(message)) from ex


def summarize_parser_error(message: str) -> str:
    """One line from jsonargparse's nested message: the full key and the innermost reason.

    Nested option groups are parsed by nested parsers whose errors arrive here already
    summarised, as the bullet under `Errors:` that is not the `null` alternative.
    """
    ours = re.search(r"((?:model|data|trainer)\.[\w.\[\]]+ = .*)", message)
    if ours:
        return ours.group(1).strip()
    key = ""
    for part in re.findall(r'Parser key "([^"]+)"', message):  # nested keys are relative
        key = part if not key or part.startswith(key + ".") else f"{key}.{part}"
    prefix = f"{key}." if key else ""
    unrecognized = re.search(r"unrecognized arguments: --([\w.]+)", message) or re.search(
        r"does not accept option '([\w.]+)'", message
    )
    if unrecognized:
        return f"{unrecognized.group(1)}: unknown option; `fit --help` lists the accepted ones"
    nested = re.search(r"[Gg]roup '([\w.]+)' does not accept nested key '([\w.]+)'", message)
    if nested:
        return f"{nested.group(1)}.{nested.group(2)}: unknown option; `fit --help` lists the accepted ones"
    bullets = [b for b in re.findall(r"^\s*- (.*)$", message, re.MULTILINE) if "NoneType" not in b]
    if bullets:
        return prefix + bullets[0].strip()
    unknown = re.search(r"Option '([^']+)' is not accepted", message) or re.search(
        r'No action for key "([^"]+)"', message
    )
    if unknown:
        return f"{prefix}{unknown.group(1)}: unknown option; `fit --help` lists the accepted ones"
    choice = re.search(
        r"(?:(\w+): )?Expected a typing\.Literal\[(.*?)\]\. Got value: (.*)", message
    )
    if choice:  # a choice: name the key (a task's arguments are its init_args), value and choices
        inner, allowed, value = choice.groups()
        if inner:
            key = f"{key}.init_args.{inner}" if key == "data.task" else f"{prefix}{inner}"
        allowed = ", ".join(a.strip().strip("'\"") for a in allowed.split(","))
        return f"{key or 'value'} = {value.strip()}: must be one of {allowed}"
    reason = re.search(r"(Expected a .*?Got value: .*)", message)
    if reason:
        return f"{prefix.rstrip('.')}: {reason.group(1).strip()}" if key else reason.group(1)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if key and lines and re.match(r"\w+ = ", lines[-1]):  # a nested key's own one-line summary
        return f"{key}.{'init_args.' if key == 'data.task' else ''}{lines[-1]}"
    return f"{key}: {lines[-1]}" if key and lines else (lines[0] if lines else message)


class VPDCLI(LightningCLI):
    def init_parser(self, **kwargs) -> LightningArgumentParser:
        self.parser_class = OneLineErrorParser
        kwargs.setdefault("epilog", EPILOG)
        return super().init_parser(**kwargs)

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            parser.add_class_arguments(PredictOptions, "sample")
        return parser

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """The trainer, with atomic checkpoint writes, the preemption save and the batch log.
        Lightning's own refusal of a trainer option (after `run.checks`) is one line too."""
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except MisconfigurationException as error:
            raise UserInputError(f"trainer: {' '.join(str(error).split())}") from None
        self.preemption = PreemptionCheckpoint()
        trainer.callbacks.extend([self.preemption, BatchLog()])
        strategy = trainer.strategy
        if strategy._checkpoint_io is None or type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand == "predict":
            config = self.config_init[subcommand]
            summary = predict(self.model, config["sample"], config.get("ckpt_path"))
            print(
                f"vpd_lightning: predicted {summary['attempts']} attempts on "
                f"{summary['prompts']} {summary['split']} prompts from {summary['checkpoint']}: "
                f"accuracy {summary['accuracy']:.3f}, mean reward {summary['mean_reward']:.3f}; "
                f"written to {summary['out']}"
            )
            return
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException:
            raise self.preemption.stopped(self.trainer) from None

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.task", "model.task", apply_on="instantiate")
        parser.add_argument(
            "--evaluate_before_after",
            type=bool,
            default=True,
            help="fit: validate before and after training and print both accuracies",
        )

    def _parse_ckpt_path(self) -> None:
        """Check `ckpt_path` against the config, instead of Lightning's default here: copying the
        checkpoint's hparams over the config, which silently replaced what the user had set
        (a resume with `--model.method grpo` kept training VPD)."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        if config.get("ckpt_path") == "last":
            config["ckpt_path"] = str(resolve_last_checkpoint(config["trainer"]))
        if config.get("ckpt_path"):
            check_checkpoint(config["ckpt_path"], config["model"])
            if subcommand != "predict":  # predict assembles a sharded folder in one process
                check_checkpoint_strategy(config["ckpt_path"], config["trainer"]["strategy"])

    def before_instantiate_classes(self) -> None:
        """Checks that need no model and that no constructor runs before the model loads."""
        config = self.config[self.subcommand]
        check_data_options(config["data"])  # the task is built before the model, this module after
        check_learning_rates(config["model"])
        check_trainer_flags(config["trainer"])
        check_trainer_values(config["trainer"])
        check_output_folders(config["trainer"])
        if self.subcommand == "predict":
            check_predict_options(config["sample"])
        check_lengths_fit(model_positions(config["model"]["model"]), config["model"])

    def after_instantiate_classes(self) -> None:
        """Prompts need the tokenizer, so their lengths are checked once it is loaded, before
        anything runs: every prompt of the splits this run reads must fit the model."""
        model, data = self.model, self.datamodule
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path and self.subcommand != "predict":  # predict loads the policy's weights only
            check_checkpoint_fits(ckpt_path, model)
        positions = positions_of(model.policy.model.config)
        check_lengths_fit(positions, model.hparams)
        if self.subcommand == "predict":
            options = self.config_init[self.subcommand]["sample"]
            splits = {options.split: data.task.records(options.split)[: options.limit]}
        else:
            splits = {data.val_split: data.val_records()}
            if self.subcommand == "fit":
                splits[data.train_split] = data.train_records()
        lengths = {
            split: [len(render_prompt(model.tokenizer, r)) for r in records]
            for split, records in splits.items()
        }
        longest_new = max(
            model.opts.rollout.max_new_tokens, model.opts.validation.max_new_tokens or 0
        )
        check_prompts_fit(positions, lengths, longest_new, model.hparams.max_context_tokens)

    def before_fit(self) -> None:
        self._before = None
        if self._wants_before_after():
            self._before = self._validate()

    def after_fit(self) -> None:
        after = None
        if self._wants_before_after():
            validated_now = self.model.last_validated_step == self.trainer.global_step
            after = self._last_validation() if validated_now else self._validate()
        log_dir = self.trainer.log_dir  # a broadcast from process 0: every process must ask
        if self.trainer.is_global_zero:
            print(self._summary(self._before, after, log_dir, self._plot()))

    def _plot(self) -> Path | None:
        """Learning curves from the CSV log, when the run has one (process 0 only)."""
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

    def _summary(
        self, before: dict | None, after: dict | None, log_dir: str | None, curves: Path | None
    ) -> str:
        trainer = self.trainer
        log_dir = Path(log_dir) if log_dir else None
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


def find_user_error(error: BaseException) -> BaseException | None:
    """The user-input error behind `error`, following jsonargparse's and Lightning's wrapping:
    our own check's error if there is one, else the outermost parser error."""
    found, seen, stack = [], set(), [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, UserInputError | NonFiniteLossError):
            found.append(current)
        stack += [current.__cause__, current.__context__]
    ours = [e for e in found if not isinstance(e, ParserError)]
    if ours or found:
        return (ours or found)[0]
    text = re.search(r"((?:model|data)\.[\w.]+ = [^\n]*)", str(error))
    return UserInputError(text.group(1)) if text else None


def main(args: list[str] | None = None) -> VPDCLI | None:
    arguments = sys.argv[1:] if args is None else args
    try:
        if arguments[:1] == ["export"]:
            from vpd_lightning.export import export_main

            export_main(arguments[1:])
            return None
        if arguments[:1] == ["seal"]:
            from vpd_lightning.seal import seal_main

            seal_main(arguments[1:])
            return None
        check_config_files(arguments)
        cli = VPDCLI(
            VPDModule,
            VPDDataModule,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
        cli.model.engine.close()  # before the process group ends (`RolloutEngine.close`)
        end_process_group()
        return cli
    except Preempted as stop:
        print(f"vpd_lightning: {stop}", file=sys.stderr, flush=True)
        raise SystemExit(stop.exit_status) from None
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is None or os.environ.get(TRACEBACK_VARIABLE):
            raise
        message = " ".join(str(user_error).split())
        print(f"vpd_lightning: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
