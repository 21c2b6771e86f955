"""Bad input through the CLI: refused before the model loads, in one line, exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import vpd_lightning.trainer.module as module_lib
from vpd_lightning.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs/tiny.yaml")
QUICKSTART = str(ROOT / "configs/quickstart.yaml")


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any attempt to load a model or tokenizer fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(module_lib, "load_causal_lm", refuse)
    monkeypatch.setattr(module_lib, "load_tokenizer", refuse)


def refused(args: list[str], capsys) -> str:
    """Run the CLI in-process; it must exit 2 with one error line on stderr and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("vpd_lightning: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


BAD_OPTIONS = [
    ("--model.rollout.num_generations", "0"),
    ("--model.rollout.num_generations", "-3"),
    ("--model.rollout.max_new_tokens", "0"),
    ("--model.rollout.temperature", "-0.5"),
    ("--model.rollout.top_p", "0"),
    ("--model.rollout.top_p", "1.5"),
    ("--model.micro_batch_size", "0"),
    ("--model.verify_workers", "-1"),
    ("--model.estep.every", "-1"),
    ("--model.validation.num_samples", "0"),
    ("--model.validation.max_new_tokens", "0"),
    ("--data.prompts_per_step", "0"),
    ("--data.val_size", "-1"),
    ("--data.val_batch_size", "0"),
    ("--model.student_optimizer.init_args.lr", "0"),
    ("--model.student_optimizer.init_args.lr", "-1e-3"),
]


@pytest.mark.parametrize(("key", "value"), BAD_OPTIONS, ids=lambda x: str(x))
def test_bad_option_values_name_key_value_and_rule(key, value, capsys, no_model_loading):
    line = refused(["fit", "--config", TINY, f"{key}={value}"], capsys)
    assert f"{key[2:]} = {float(value)!r}" in line or f"{key[2:]} = {value}" in line, line
    assert "must be" in line


@pytest.mark.parametrize(
    ("key", "value", "choices"),
    [
        ("--data.task.init_args.feedback", "hint", "binary, outcome, diagnostic, solution"),
        ("--model.method", "dpo", "vpd, sdpo, opsd, grpo"),
        ("--model.distill.divergence", "kl", "reverse_kl, forward_kl, jsd"),
    ],
)
def test_a_bad_choice_names_its_full_key_value_and_the_choices(
    key, value, choices, capsys, no_model_loading
):
    line = refused(["fit", "--config", TINY, f"{key}={value}"], capsys)
    assert line.endswith(f"{key[2:]} = {value}: must be one of {choices}"), line


def test_a_bad_teacher_learning_rate_is_refused(tmp_path, capsys, no_model_loading):
    config = tmp_path / "teacher.yaml"
    config.write_text(
        "model:\n  teacher_optimizer:\n    class_path: torch.optim.AdamW\n"
        "    init_args: {lr: -1.0}\n"
    )
    line = refused(["fit", "--config", TINY, "--config", str(config)], capsys)
    assert "model.teacher_optimizer.init_args.lr = -1.0: must be a number > 0" in line


def test_unknown_and_mistyped_keys_are_one_line(capsys, no_model_loading):
    line = refused(["fit", "--config", TINY, "--model.estep.evry", "3"], capsys)
    assert "model.estep.evry: unknown option" in line
    line = refused(["fit", "--config", TINY, "--model.rollout.num_generations", "x"], capsys)
    assert "model.rollout.num_generations" in line and "x" in line


@pytest.mark.parametrize(
    ("content", "expected"),
    [("", "the file is empty"), ("- a\n- b\n", "expected a mapping"), ("a: [\n", "not valid YAML")],
)
def test_empty_or_broken_config_files(content, expected, tmp_path, capsys, no_model_loading):
    config = tmp_path / "config.yaml"
    config.write_text(content)
    line = refused(["fit", "--config", str(config)], capsys)
    assert str(config) in line and expected in line


def jsonl_args(path: Path) -> list[str]:
    return ["fit", "--config", TINY, "--data.task", "vpd_lightning.tasks.JsonlTask"] + [
        "--data.task.path",
        str(path),
    ]


def test_jsonl_errors_name_the_file_and_its_line(tmp_path, capsys, no_model_loading):
    good = [json.dumps({"prompt": f"q{i}", "answer": str(i)}) for i in range(6)]
    missing_field = tmp_path / "missing_field.jsonl"
    missing_field.write_text("\n".join([*good[:4], '{"prompt": "no answer"}', *good[4:]]) + "\n")
    assert f"{missing_field}:5: needs exactly one of" in refused(jsonl_args(missing_field), capsys)

    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text("\n".join([*good[:2], "", '{"prompt": "q", ', *good[2:]]) + "\n")
    assert f"{malformed}:4: not valid JSON" in refused(jsonl_args(malformed), capsys)

    no_prompt = tmp_path / "no_prompt.jsonl"
    no_prompt.write_text(json.dumps({"answer": "1"}) + "\n")
    assert f"{no_prompt}:1: needs `prompt`" in refused(jsonl_args(no_prompt), capsys)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert f"{empty}: the file has no records" in refused(jsonl_args(empty), capsys)

    line = refused(jsonl_args(tmp_path / "nowhere.jsonl"), capsys)
    assert "data.task.path = " in line and "nowhere.jsonl" in line and "no such file" in line


def test_a_model_folder_without_config_is_refused(tmp_path, capsys):
    line = refused(["fit", "--config", TINY, "--model.model", str(tmp_path)], capsys)
    assert f"model.model = '{tmp_path}': no config.json" in line


def test_an_unreachable_model_id_fails_fast_without_traceback(tmp_path):
    """Not a local folder, not in the cache, and the hub unreachable: one line, with no retries:
    within 30 s, most of it the interpreter's imports (10 s alone, 19 s seen on 2 busy cores)."""
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_ENDPOINT": "http://127.0.0.1:9",  # the discard port: nothing listens there
    }
    env.pop("HF_HUB_OFFLINE", None)
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "vpd_lightning", "fit", "--config", QUICKSTART]
        + ["--model.model", "someone/no-such-model"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "model.model = 'someone/no-such-model': not found locally" in result.stderr
    assert "could not be reached" in result.stderr
    assert elapsed < 30, f"took {elapsed:.1f} s"


def test_missing_empty_and_foreign_checkpoints_are_refused(tmp_path, capsys, no_model_loading):
    def ckpt_line(path: Path) -> str:
        return refused(["fit", "--config", TINY, "--ckpt_path", str(path)], capsys)

    assert "no such file" in ckpt_line(tmp_path / "missing.ckpt")
    empty = tmp_path / "empty.ckpt"
    empty.touch()
    assert f"{empty}: the file is empty (0 bytes)" in ckpt_line(empty)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(os.urandom(4096))
    assert "not a checkpoint of this trainer" in ckpt_line(garbage)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    assert "not written by vpd_lightning" in ckpt_line(foreign)
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"vpd_state": Path("a")}, pickled)  # loading it would need weights_only=False
    line = ckpt_line(pickled)
    assert "not a checkpoint of this trainer" in line and "weights_only" not in line


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory) -> Path:
    """One step of tiny.yaml with LoRA r=4, checkpointed."""
    run = tmp_path_factory.mktemp("run")
    cwd = os.getcwd()
    os.chdir(run)
    try:
        main(
            ["fit", "--config", TINY, "--model.lora.r", "4", "--trainer.max_steps", "1"]
            + ["--trainer.enable_progress_bar", "false", "--evaluate_before_after", "false"]
        )
    finally:
        os.chdir(cwd)
    (checkpoint,) = (run / "runs/tiny/version_0/checkpoints").glob("last.ckpt")
    return checkpoint


def test_resuming_with_a_different_training_setup_lists_every_difference(
    lora_checkpoint, capsys, no_model_loading
):
    line = refused(
        ["fit", "--config", TINY, "--ckpt_path", str(lora_checkpoint)]
        + ["--model.method", "grpo", "--model.lora.r", "8"]
        + ["--model.student_optimizer", "torch.optim.SGD"],
        capsys,
    )
    assert "changes what the checkpoint was trained as" in line
    for difference in (
        "model.method: 'vpd' -> 'grpo'",
        "model.lora.r: 4 -> 8",
        "model.student_optimizer: 'AdamW' -> 'SGD'",
    ):
        assert difference in line, line
    line = refused(["fit", "--config", TINY, "--ckpt_path", str(lora_checkpoint)], capsys)
    assert "model.lora: 'set' -> 'null'" in line


def test_resuming_with_safe_changes_trains_on(lora_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(
        ["fit", "--config", TINY, "--ckpt_path", str(lora_checkpoint), "--model.lora.r", "4"]
        + ["--trainer.max_steps", "2", "--model.student_optimizer.init_args.lr", "0.01"]
        + ["--trainer.val_check_interval", "1", "--trainer.enable_progress_bar", "false"]
    )
    assert cli.trainer.global_step == 2


@pytest.mark.parametrize(
    ("flag", "value", "instead"),
    [
        ("accumulate_grad_batches", "2", "model.micro_batch_size"),
        ("gradient_clip_val", "1", "model.student_grad_clip and model.teacher_grad_clip"),
    ],
)
def test_trainer_flags_manual_optimization_cannot_honour_name_our_option(
    flag, value, instead, capsys, no_model_loading
):
    line = refused(["fit", "--config", TINY, f"--trainer.{flag}", value], capsys)
    assert f"trainer.{flag} = " in line and "manual optimization" in line and instead in line


def test_a_config_that_gives_a_top_level_key_twice_is_refused(tmp_path, capsys, no_model_loading):
    twice = tmp_path / "twice.yaml"
    twice.write_text(
        "trainer:\n  accelerator: cpu\nmodel:\n  method: vpd\ntrainer:\n  max_steps: 2\n"
    )
    line = refused(["fit", "--config", TINY, "--config", str(twice)], capsys)
    assert f"--config {twice}: key 'trainer' is given twice (lines 1 and 5)" in line


def test_max_new_tokens_beyond_the_model_context_is_refused(capsys, no_model_loading):
    line = refused(["fit", "--config", TINY, "--model.rollout.max_new_tokens", "1000"], capsys)
    assert "model.rollout.max_new_tokens = 1000" in line and "1024 positions" in line


def test_ckpt_path_last_without_a_run_explains(tmp_path, monkeypatch, capsys, no_model_loading):
    monkeypatch.chdir(tmp_path)
    line = refused(["fit", "--config", TINY, "--ckpt_path", "last"], capsys)
    assert "ckpt_path last: no runs/tiny/version_*/checkpoints/last.ckpt" in line


def test_a_prompt_longer_than_the_model_context_is_refused_before_training(tmp_path, capsys):
    records = [{"prompt": f"q{i}", "answer": str(i)} for i in range(6)]
    records[2]["prompt"] = "x" * 3000  # the tiny tokenizer: one token per byte
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    start = time.perf_counter()
    line = refused(jsonl_args(path), capsys)
    assert "split 'train': 1 of " in line and "do not fit the model's 1024 positions" in line
    assert time.perf_counter() - start < 30


def test_predict_writes_one_line_per_attempt_and_the_accuracy(tmp_path, capsys):
    out = tmp_path / "predictions.jsonl"
    args = ["predict", "--config", TINY, "--sample.out", str(out), "--sample.limit", "3"]
    main(args)
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 3 * 2  # tiny.yaml: validation.num_samples 2
    assert [(r["index"], r["sample"]) for r in lines] == [(i, s) for i in range(3) for s in (0, 1)]
    for line in lines:
        assert set(line) == {"index", "sample", "prompt", "completion", "reward", "feedback"}
        assert isinstance(line["reward"], float) and line["feedback"]
        assert "<|im_start|>user" in line["prompt"]
    printed = capsys.readouterr().out
    assert "predicted 6 attempts on 3 test prompts from (base model): accuracy " in printed


def test_help_lists_export_and_predict(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "export CKPT OUT_DIR" in out and "predict --config" in out
