"""Every check a run meets before it starts, in the order it meets them.

1. config: each `--config` file within the YAML budget (`config_files`), a mapping, no key twice;
   then the options (`options.py` validates each option group's values where it is built,
   `algorithm/methods.py` the combinations each method allows); the trainer's flags, learning
   rates and the folders the run writes are checked here.
2. data files: the task reads and checks its records (`tasks/`, `file:line`) when it is built;
   the data module's counts here.
3. model: the responses and the teacher's context fit the model's positions (from its config
   alone, then every prompt once the tokenizer is loaded).
4. checkpoint: `--ckpt_path last` resolved; the checkpoint read without running or expanding
   anything (`trainer/checkpoint_files.py`), its counters, what it was trained as against the
   config, and, once the model is built, its size budget and weight shapes.
5. strategy: a sharded checkpoint needs fsdp2 (the strategies themselves: `trainer/strategies.py`).
Each raises `UserInputError`: the key or file, the value, the rule and the fix, in one line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from vpd_lightning.algorithm.methods import METHODS
from vpd_lightning.errors import UserInputError
from vpd_lightning.policy.models import TINY_ALIAS
from vpd_lightning.policy.tiny import MAX_POSITIONS as TINY_POSITIONS
from vpd_lightning.run.config_files import read_config_text
from vpd_lightning.tasks.base import SPLITS
from vpd_lightning.trainer.checkpoint_files import (
    SHARDED_METADATA,
    check_size,
    parameter_bytes,
    read_archive,
    read_dcp_metadata,
    size_budget,
    verify_folder,
)
from vpd_lightning.trainer.data import VPDDataModule
from vpd_lightning.trainer.strategies import FSDP2

LAST = "last.ckpt"
MANUAL_ONLY = {  # trainer flag: (the value that means off, the project's own option)
    "accumulate_grad_batches": (
        1,
        "model.micro_batch_size (sequences per forward/backward; a step already accumulates "
        "over its whole batch) or data.prompts_per_step",
    ),
    "gradient_clip_val": (None, "model.student_grad_clip and model.teacher_grad_clip"),
    "gradient_clip_algorithm": (None, "model.student_grad_clip and model.teacher_grad_clip"),
}
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


DEFAULT_OPTIMIZER = "AdamW"
ROLES = ("student", "teacher")
# Settings that only some methods have (`MethodSpec.resume_keys` says which).
METHOD_SPECIFIC = {"model.estep.prior", "model.teacher_optimizer", "model.sdpo.teacher"}


# ---------------------------------------------------------------------------- 1. config


def check_config_files(args: list[str]) -> None:
    """Each `--config` file exists, is within the YAML budget (`run.config_files`) and holds a
    YAML mapping (jsonargparse's own message for an empty file is `Unexpected config:` and
    nothing after it)."""
    for index, arg in enumerate(args):
        if arg in ("--config", "-c") and index + 1 < len(args):
            path = args[index + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            continue
        text = read_config_text(path)
        try:
            content = yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader
        except DuplicateKeyError as error:
            raise UserInputError(f"--config {path}: {error}") from None
        except yaml.YAMLError as error:
            line = getattr(getattr(error, "problem_mark", None), "line", None)
            where = f" at line {line + 1}" if line is not None else ""
            raise UserInputError(f"--config {path}: not valid YAML{where}") from None
        if content is None:
            raise UserInputError(
                f"--config {path}: the file is empty; start from configs/tiny.yaml or "
                "`fit --print_config`"
            )
        if not isinstance(content, dict):
            raise UserInputError(
                f"--config {path}: expected a mapping of option groups (trainer:, model:, data:), "
                f"got a {type(content).__name__}"
            )


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that gives one key twice (plain YAML keeps the last and drops the rest)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key given twice in one mapping, at any depth."""

    def construct_mapping(self, node, deep=False):
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key != "<<" and key in seen:
                raise DuplicateKeyError(
                    f"key {key!r} is given twice (lines {seen[key]} and {line}); YAML would keep "
                    "only the second block and drop the first silently: merge them into one"
                )
            seen.setdefault(key, line)
        return super().construct_mapping(node, deep=deep)


def check_trainer_flags(trainer_config: Any) -> None:
    """Refuse flags that Lightning cannot apply to a module that steps its optimizers by hand."""
    for key, (off, instead) in MANUAL_ONLY.items():
        value = config_get(trainer_config, key)
        if value is not None and value != off and not (key == "gradient_clip_val" and value == 0):
            raise UserInputError(
                f"trainer.{key} = {value!r}: this module steps its optimizers by hand (manual "
                f"optimization), which Lightning's {key} does not apply to; use {instead}"
            )


PRECISIONS = ("32", "32-true", "16", "16-mixed", "bf16", "bf16-mixed", "16-true", "bf16-true")


def check_trainer_values(trainer_config: Any) -> None:
    """Values Lightning accepts but this trainer cannot run, and ones Lightning refuses only
    with a traceback (or never: `max_steps -1` never ends, since the prompts never run out)."""
    max_steps = config_get(trainer_config, "max_steps")
    if not _whole(max_steps, 1):
        raise UserInputError(
            f"trainer.max_steps = {max_steps!r}: must be a whole number >= 1 (the run's length; "
            "the prompts never run out, so Lightning's -1, no limit, would never end)"
        )
    interval = config_get(trainer_config, "val_check_interval")
    if interval is not None and not (
        _whole(interval, 1) or (type(interval) is float and 0 < interval <= 1)
    ):
        raise UserInputError(
            f"trainer.val_check_interval = {interval!r}: must be a whole number of steps >= 1 "
            "(or a fraction in (0, 1])"
        )
    for key in ("num_nodes", "log_every_n_steps"):
        value = config_get(trainer_config, key)
        if value is not None and not _whole(value, 1):
            raise UserInputError(f"trainer.{key} = {value!r}: must be a whole number >= 1")
    devices = config_get(trainer_config, "devices")
    if not (
        devices in (None, "auto", -1, "-1")
        or _whole(devices, 1)
        or (
            isinstance(devices, str)
            and devices.replace(",", "").strip().isdigit()
            and devices.strip() != "0"
        )
        or (isinstance(devices, list) and devices and all(_whole(d, 0) for d in devices))
    ):
        raise UserInputError(
            f"trainer.devices = {devices!r}: must be a number of devices >= 1, -1 (all), "
            "auto, or a non-empty list of device indices"
        )
    precision = config_get(trainer_config, "precision")
    if precision is not None and str(precision) not in PRECISIONS:
        raise UserInputError(
            f"trainer.precision = {precision!r}: must be one of {', '.join(PRECISIONS)} (the "
            "model and the fused kernels compute in float32, bfloat16 or float16)"
        )


def check_output_folders(trainer_config: Any) -> None:
    """The folders the run writes can be folders, and a logger version given explicitly names
    a fresh one: reusing one would overwrite that run's metrics.csv, so it is refused (leave
    `version` unset to get the next free one)."""
    logger = config_get(trainer_config, "logger")
    init = config_get(logger, "init_args") if not isinstance(logger, bool) else None
    folders = {
        "trainer.default_root_dir": config_get(trainer_config, "default_root_dir"),
        "trainer.logger.init_args.save_dir": config_get(init, "save_dir"),
    }
    for callback in config_get(trainer_config, "callbacks") or []:
        if str(config_get(callback, "class_path", "")).endswith("ModelCheckpoint"):
            dirpath = config_get(config_get(callback, "init_args"), "dirpath")
            folders["ModelCheckpoint.init_args.dirpath"] = dirpath
    for key, folder in folders.items():
        if folder is None:
            continue
        existing = Path(folder)
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if existing.exists() and not existing.is_dir():
            raise UserInputError(
                f"{key} = {str(folder)!r}: {existing} is a file, not a folder; give a folder the "
                "run can write in"
            )
    version = config_get(init, "version")
    save_dir = config_get(init, "save_dir")
    if version is not None and save_dir is not None:
        name = config_get(init, "name")
        run = (
            Path(save_dir)
            / (name or "")
            / (f"version_{version}" if isinstance(version, int) else str(version))
        )
        if run.is_dir() and any(run.iterdir()):
            raise UserInputError(
                f"trainer.logger.init_args.version = {version!r}: {run} already holds a run, "
                "whose metrics.csv this one would overwrite; give another version, or leave "
                "version unset for the next free one"
            )


def _whole(value: object, least: int) -> bool:
    return type(value) is int and value >= least


def check_learning_rates(model_config: Any) -> None:
    """Each configured optimizer's `lr`, when given, is a finite number > 0."""
    for role in ROLES:
        optimizer = config_get(model_config, f"{role}_optimizer")
        lr = config_get(config_get(optimizer, "init_args"), "lr")
        if lr is not None and not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
            raise UserInputError(
                f"model.{role}_optimizer.init_args.lr = {lr!r}: must be a number > 0"
            )


def check_predict_options(options: Any) -> None:
    """`predict`'s own options: a split tasks have, counts >= 1, and an output file (not a folder)."""
    split, out = config_get(options, "split"), Path(str(config_get(options, "out")))
    if split not in SPLITS:
        raise UserInputError(
            f"sample.split = {split!r}: must be one of {', '.join(SPLITS)} (the splits every task has)"
        )
    for key in ("batch_size", "limit"):
        value = config_get(options, key)
        if value is not None and not _whole(value, 1):
            raise UserInputError(f"sample.{key} = {value!r}: must be a whole number >= 1")
    if out.is_dir():
        raise UserInputError(f"sample.out = {str(out)!r}: is a folder; give a .jsonl file to write")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserInputError(f"sample.out = {str(out)!r}: {parent} is a file, not a folder")


# ------------------------------------------------------------------------ 2. data files


def check_data_options(data_config: Any) -> None:
    """The data module's counts (the task checks its own records when it is built)."""
    VPDDataModule.check_options(
        config_get(data_config, "prompts_per_step"),
        config_get(data_config, "val_size"),
        config_get(data_config, "val_batch_size"),
    )


# ----------------------------------------------------------------------------- 3. model


def model_positions(name: str) -> int | None:
    """The model's context length from its config alone (no weights); None if not known yet."""
    if name == TINY_ALIAS:
        return TINY_POSITIONS
    config = Path(name) / "config.json"
    if not config.is_file():
        return None
    try:
        return positions_of(json.loads(config.read_text(encoding="utf-8")))
    except (ValueError, UnicodeDecodeError):
        return None


def positions_of(config: Any) -> int | None:
    for key in POSITION_KEYS:
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_lengths_fit(positions: int | None, model_config: Any) -> None:
    """The longest responses and the teacher's context leave room for a prompt."""
    if positions is None:
        return
    context = config_get(model_config, "max_context_tokens", 256)
    for key in ("rollout", "validation"):
        new = config_get(config_get(model_config, key), "max_new_tokens")
        if new is not None and new + context >= positions:
            raise UserInputError(
                f"model.{key}.max_new_tokens = {new}: with model.max_context_tokens = {context} "
                f"it leaves no room for a prompt in the model's {positions} positions; lower it "
                f"below {positions - context}"
            )


def check_prompts_fit(
    positions: int | None,
    lengths: dict[str, Sequence[int]],
    max_new_tokens: int,
    context_tokens: int,
) -> None:
    """Every prompt + the teacher's context + the longest response fits the model's positions."""
    if positions is None:
        return
    room = positions - max_new_tokens - context_tokens
    for split, sizes in lengths.items():
        over = [n for n in sizes if n > room]
        if over:
            raise UserInputError(
                f"data.task, split {split!r}: {len(over)} of {len(sizes)} prompts do not fit the "
                f"model's {positions} positions (longest {max(over)} tokens; at most {room} fit "
                f"beside model.rollout.max_new_tokens = {max_new_tokens} and "
                f"model.max_context_tokens = {context_tokens}); shorten or drop those prompts, or "
                "lower max_new_tokens"
            )


# ------------------------------------------------------------------------ 4. checkpoint


def resolve_last_checkpoint(trainer_config: Any) -> Path:
    """`--ckpt_path last`: the newest run's `last.ckpt` of this config's logger (or the
    ModelCheckpoint `dirpath` it sets), not the new run's empty folder."""
    for callback in config_get(trainer_config, "callbacks") or []:
        dirpath = config_get(config_get(callback, "init_args"), "dirpath")
        if str(config_get(callback, "class_path", "")).endswith("ModelCheckpoint") and dirpath:
            found = Path(dirpath) / LAST
            if found.is_file() or found.is_dir():
                return found
            raise UserInputError(f"ckpt_path last: no {found}; give the checkpoint's path")
    logger = config_get(trainer_config, "logger")
    init = config_get(logger, "init_args") or logger
    save_dir = config_get(init, "save_dir") or config_get(trainer_config, "default_root_dir") or "."
    name = config_get(init, "name")
    root = Path(save_dir) / name if name else Path(save_dir)
    versions = [p for p in root.glob("version_*") if (p / "checkpoints" / LAST).exists()]
    versions.sort(key=lambda p: int(p.name[8:]) if p.name[8:].isdigit() else -1)
    if not versions:
        raise UserInputError(
            f"ckpt_path last: no {root}/version_*/checkpoints/{LAST} (the logger's runs); give "
            "the checkpoint's path"
        )
    return versions[-1] / "checkpoints" / LAST


def sharded_metadata(folder: Path) -> Path:
    """The `meta.pt` of a sharded (fsdp2) checkpoint folder, or a `UserInputError`."""
    if not (folder / SHARDED_METADATA).is_file():
        raise UserInputError(
            f"ckpt_path {folder}: is a directory without {SHARDED_METADATA}, so not a sharded "
            "(fsdp2) checkpoint; give the .ckpt file in it"
        )
    return folder / SHARDED_METADATA


def load_checkpoint_file(path: str | Path) -> dict:
    """The checkpoint's contents (of a sharded folder: its `meta.pt`, without the weights), read
    without running or expanding anything (`checkpoint_files`), or a `UserInputError` that names
    the file and what is wrong. A folder's checksums and items are verified here, a file's
    checksum where its weights are loaded."""
    file = Path(path)
    if not file.exists():
        raise UserInputError(f"ckpt_path {path}: no such file")
    if file.is_dir():
        metadata = sharded_metadata(file)
        verify_folder(file)
        file = metadata
    checkpoint = read_archive(file, str(path))
    if not isinstance(checkpoint, dict) or "vpd_state" not in checkpoint:
        raise UserInputError(
            f"ckpt_path {path}: not written by vpd_lightning's VPDModule (no vpd_state); give "
            "a .ckpt file from a run's checkpoints/ folder"
        )
    return checkpoint


def check_checkpoint_fits(path: str | Path, module: torch.nn.Module) -> None:
    """The checkpoint holds at most `size_budget` of the built module, and exactly its weights,
    each of the module's shape; checked from the file's index (no weight is read)."""
    check_size(path, size_budget(parameter_bytes(module)))
    folder = Path(path)
    if folder.is_dir():
        metadata = read_dcp_metadata(folder).state_dict_metadata
        prefix = "state_dict."
        shapes = {
            k[len(prefix) :]: tuple(v.size) for k, v in metadata.items() if k.startswith(prefix)
        }
    else:
        shapes = {k: tuple(v.shape) for k, v in read_archive(folder)["state_dict"].items()}
    problem = weight_differences(
        {k: tuple(v.shape) for k, v in module.state_dict().items()}, shapes
    )
    if problem:
        raise UserInputError(f"ckpt_path {path}: {problem}; it was not written for this model")


def weight_differences(own: dict[str, tuple], theirs: dict[str, tuple]) -> str | None:
    """What differs between a model's weight shapes and a checkpoint's, or None."""
    missing, extra = sorted(own.keys() - theirs.keys()), sorted(theirs.keys() - own.keys())
    for problem, keys in (("lacks", missing), ("has unknown", extra)):
        if keys:
            more = " ..." if len(keys) > 3 else ""
            return f"{problem} weight(s) {', '.join(keys[:3])}{more} ({len(keys)} in all)"
    reshaped = sorted(k for k in own.keys() & theirs.keys() if own[k] != theirs[k])
    if reshaped:
        key = reshaped[0]
        return (
            f"weight {key} has shape {theirs[key]}, the model's is {own[key]} "
            f"({len(reshaped)} differ)"
        )
    return None


def trained_as(hparams: dict, optimizers: list[str]) -> dict[str, object]:
    """What a run was trained as, from a checkpoint's hparams and optimizer classes."""
    lora = hparams.get("lora") or {}
    return _applicable(
        hparams.get("method"),
        {
            "model.model": hparams.get("model"),
            "model.method": hparams.get("method"),
            "model.teacher_mode": hparams.get("teacher_mode"),
            "model.dtype": hparams.get("dtype"),
            "model.lora": "null" if not lora else "set",
            "model.lora.r": lora.get("r"),
            "model.lora.alpha": lora.get("alpha"),
            "model.lora.target_modules": _as_list(lora.get("target_modules")),
            "model.estep.prior": (hparams.get("estep") or {}).get("prior"),
            "model.sdpo.teacher": (hparams.get("sdpo") or {}).get("teacher"),
            "model.student_optimizer": optimizers[0] if optimizers else None,
            "model.teacher_optimizer": optimizers[1] if len(optimizers) > 1 else None,
        },
    )


def configured_as(model_config: Any) -> dict[str, object]:
    """The same keys as `trained_as`, from the (not yet instantiated) `model` config."""
    lora = config_get(model_config, "lora")
    student = _optimizer_class(config_get(model_config, "student_optimizer"))
    return _applicable(
        config_get(model_config, "method"),
        {
            "model.model": config_get(model_config, "model"),
            "model.method": config_get(model_config, "method"),
            "model.teacher_mode": config_get(model_config, "teacher_mode"),
            "model.dtype": config_get(model_config, "dtype"),
            "model.lora": "null" if lora is None else "set",
            "model.lora.r": config_get(lora, "r"),
            "model.lora.alpha": config_get(lora, "alpha"),
            "model.lora.target_modules": _as_list(config_get(lora, "target_modules")),
            "model.estep.prior": config_get(config_get(model_config, "estep"), "prior", "student"),
            "model.sdpo.teacher": config_get(config_get(model_config, "sdpo"), "teacher", "ema"),
            "model.student_optimizer": student,
            "model.teacher_optimizer": _optimizer_class(
                config_get(model_config, "teacher_optimizer"), default=student
            ),
        },
    )


def _applicable(method: str | None, settings: dict[str, object]) -> dict[str, object]:
    """`settings` with the method-specific ones that do not apply to `method` set to None."""
    spec = METHODS.get(method)
    applies = set(spec.resume_keys()) if spec else set()
    return {k: v if k not in METHOD_SPECIFIC or k in applies else None for k, v in settings.items()}


def check_checkpoint(path: str | Path, model_config: Any) -> None:
    """The checkpoint is readable and was trained as the config says; else list what differs."""
    checkpoint = load_checkpoint_file(path)
    for key in ("global_step", "epoch"):
        value = checkpoint.get(key)
        if type(value) is not int or value < 0:
            raise UserInputError(
                f"ckpt_path {path}: {key} = {value!r}: must be a whole number >= 0 (a counter "
                "the trainer wrote); the checkpoint was edited or is broken"
            )
    before = trained_as(
        checkpoint.get("hyper_parameters", {}), checkpoint["vpd_state"].get("optimizers", [])
    )
    now = configured_as(model_config)
    differences = [
        f"{key}: {before[key]!r} -> {now[key]!r}"
        for key in before
        if None not in (before[key], now[key]) and before[key] != now[key]
    ]  # None: the setting does not apply to that method (then the method itself differs)
    if differences:
        raise UserInputError(
            f"ckpt_path {path}: the config changes what the checkpoint was trained as ("
            + "; ".join(differences)
            + "). Resume with the run's own config.yaml, changing only steps, logging, "
            "validation or learning rates"
        )


def _optimizer_class(config: Any, default: str = DEFAULT_OPTIMIZER) -> str:
    if config is None:
        return default
    class_path = config_get(config, "class_path")
    if class_path is None:  # a callable given in Python, not a config
        return getattr(config, "__name__", default)
    return str(class_path).rsplit(".", 1)[-1]


def _as_list(value: object) -> object:
    return list(value) if isinstance(value, list | tuple) else value


# -------------------------------------------------------------------------- 5. strategy


def check_checkpoint_strategy(ckpt_path: str | Path, strategy: object) -> None:
    """A sharded checkpoint (a folder) loads only under FSDP2; a checkpoint file loads under any
    strategy. `strategy` is the config's value: a name, a class_path config, or an instance."""
    if not Path(ckpt_path).is_dir():
        return
    name = strategy if isinstance(strategy, str) else getattr(strategy, "class_path", None)
    name = name or type(strategy).__name__
    if name == FSDP2 or name.endswith(("ModelParallelStrategy", "FSDP2Strategy")):
        return
    raise UserInputError(
        f"ckpt_path {ckpt_path}: a sharded (fsdp2) checkpoint folder, but trainer.strategy = "
        f"{name!r}; load it with --trainer.strategy {FSDP2}, or write it as a Hugging Face model "
        "with `python -m vpd_lightning export`"
    )


def config_get(config: Any, key: str, default: object = None) -> Any:
    """`config[key]` for a dict, a jsonargparse Namespace or a dataclass; `default` if absent."""
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(key, default)
    value = getattr(config, key, default)
    return default if value is None else value
