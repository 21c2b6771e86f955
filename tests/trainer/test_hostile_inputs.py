"""Hostile configs and options through the CLI: bounded before they are expanded, one line and
exit 2 instead of a traceback, a hang or another run's lost metrics."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from vpd_lightning.errors import UserInputError
from vpd_lightning.run.config_files import MAX_CONFIG_BYTES, check_yaml_budget

from . import test_bad_input
from .test_bad_input import TINY, refused

no_model_loading = test_bad_input.no_model_loading  # the fixture: no model may load


def laughs(levels: int = 9) -> str:
    """The "billion laughs": each level lists the previous one 9 times (9**levels leaves)."""
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


def test_a_yaml_bomb_config_is_refused_from_its_composed_graph_in_well_under_a_second(
    tmp_path, capsys, no_model_loading
):
    bomb = tmp_path / "laughs.yaml"
    bomb.write_text(laughs())
    assert bomb.stat().st_size < 600
    start = time.perf_counter()
    with pytest.raises(UserInputError, match=r"aliases expand to \d{9} nodes"):
        check_yaml_budget(bomb.read_text(), "x")
    assert time.perf_counter() - start < 0.5
    line = refused(["fit", "--config", TINY, "--config", str(bomb)], capsys)
    assert f"--config {bomb}: its aliases expand to" in line and "YAML bomb" in line


def test_a_yaml_bomb_in_a_command_line_value_is_refused(capsys, no_model_loading):
    value = "{" + laughs().replace("\n", ", ").rstrip(", ") + "}"
    line = refused(["fit", "--config", TINY, "--data.task.init_args", value], capsys)
    assert "a YAML value: its aliases expand to" in line


def test_a_recursive_anchor_is_refused(tmp_path, capsys, no_model_loading):
    config = tmp_path / "recursive.yaml"
    config.write_text("seed_everything: &a [*a]\n")
    line = refused(["fit", "--config", TINY, "--config", str(config)], capsys)
    assert "an alias contains itself" in line


def test_a_config_file_over_the_size_budget_is_refused_unread(tmp_path, capsys, no_model_loading):
    config = tmp_path / "comments.yaml"
    config.write_text(("# " + "x" * 97 + "\n") * (MAX_CONFIG_BYTES // 100 + 1))
    line = refused(["fit", "--config", TINY, "--config", str(config)], capsys)
    assert f"more than the {MAX_CONFIG_BYTES} a config file may hold" in line


def test_honest_anchors_are_accepted():
    check_yaml_budget("a: &x {lr: 1.0e-3}\nb: *x\nc: {<<: *x, wd: 0}\n", "x")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--trainer.max_steps", "-1"], "trainer.max_steps = -1: must be a whole number >= 1"),
        (["--trainer.max_steps", "0"], "trainer.max_steps = 0: must be a whole number >= 1"),
        (["--trainer.val_check_interval", "0"], "trainer.val_check_interval = 0: must be a whole"),
        (["--trainer.precision", "64"], "trainer.precision = 64: must be one of 32, 32-true"),
        (["--trainer.devices", "0"], "trainer.devices = '0': must be a number of devices >= 1"),
        (["--trainer.devices", "-2"], "trainer.devices = '-2': must be a number of devices >= 1"),
        (["--trainer.num_nodes", "0"], "trainer.num_nodes = 0: must be a whole number >= 1"),
        (["--trainer.log_every_n_steps", "0"], "trainer.log_every_n_steps = 0: must be a whole"),
    ],
)
def test_trainer_values_lightning_would_hang_or_trace_on_are_one_line(
    args, expected, capsys, no_model_loading
):
    assert expected in refused(["fit", "--config", TINY, *args], capsys)


def test_output_folders_that_are_files_are_refused(tmp_path, capsys, no_model_loading):
    file = tmp_path / "a-file"
    file.write_text("x")
    for key in ("--trainer.logger.init_args.save_dir", "--trainer.default_root_dir"):
        line = refused(["fit", "--config", TINY, key, str(file / "under")], capsys)
        assert f"{file} is a file, not a folder" in line, line


def test_a_logger_version_that_holds_a_run_is_refused_not_overwritten(
    tmp_path, capsys, monkeypatch, no_model_loading
):
    monkeypatch.chdir(tmp_path)
    earlier = tmp_path / "runs/tiny/version_3"
    earlier.mkdir(parents=True)
    (earlier / "metrics.csv").write_text("step,train/reward_mean\n1,0.5\n")
    line = refused(["fit", "--config", TINY, "--trainer.logger.init_args.version", "3"], capsys)
    assert "version = 3: runs/tiny/version_3 already holds a run" in line
    assert (earlier / "metrics.csv").read_text().endswith("1,0.5\n")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--sample.split", "validation"], "sample.split = 'validation': must be one of train"),
        (["--sample.batch_size", "0"], "sample.batch_size = 0: must be a whole number >= 1"),
        (["--sample.limit", "-1"], "sample.limit = -1: must be a whole number >= 1"),
    ],
)
def test_bad_predict_options_are_one_line(args, expected, tmp_path, capsys, no_model_loading):
    out = ["--sample.out", str(tmp_path / "p.jsonl")]
    assert expected in refused(["predict", "--config", TINY, *out, *args], capsys)


def test_predict_into_a_folder_is_refused(tmp_path, capsys, no_model_loading):
    line = refused(["predict", "--config", TINY, "--sample.out", str(tmp_path)], capsys)
    assert "is a folder; give a .jsonl file" in line


def test_lora_target_modules_that_match_nothing_name_the_layers(capsys):
    line = refused(
        ["fit", "--config", TINY, "--model.lora", "{r: 4, target_modules: [nope]}"], capsys
    )
    assert "model.lora.target_modules = ['nope']: matches no module" in line and "q_proj" in line


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (["2+2?"], "`prompt[0]` = '2+2?': a chat message is an object"),
        ([{"role": "wizard", "content": "2+2?"}], "`prompt[0].role` = 'wizard': must be one of"),
        ([{"role": "system", "content": "be brief"}], "`prompt` has no user message"),
    ],
)
def test_bad_chat_prompts_are_refused_with_file_and_line(
    prompt, expected, tmp_path, capsys, no_model_loading
):
    path = tmp_path / "tasks.jsonl"
    good = [json.dumps({"prompt": f"q{i}", "answer": str(i)}) for i in range(4)]
    path.write_text("\n".join([*good, json.dumps({"prompt": prompt, "answer": "4"})]) + "\n")
    line = refused(
        ["fit", "--config", TINY, "--data.task", "vpd_lightning.tasks.JsonlTask"]
        + ["--data.task.path", str(path)],
        capsys,
    )
    assert f"{path}:5: {expected}" in line, line


def test_the_yaml_budget_counts_shared_nodes_once_per_use(tmp_path: Path):
    """Nine uses of one 9-item list: 1 + 9 * (1 + 9) nodes, not 1 + 9 + 9."""
    from vpd_lightning.run.config_files import BaseLoader, expanded_size

    loader = BaseLoader("a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9]\nb: [*a, *a, *a, *a, *a, *a, *a, *a]\n")
    root = loader.get_single_node()
    nodes, chars = expanded_size(root, "x")
    assert nodes == 1 + 2 + 10 + 1 + 8 * 10 and chars == 2 + 9 + 8 * 9
