"""The README's promises: its commands and Python example run, its tables match their sources."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_kernels_example_runs(capsys):
    (example,) = re.findall(r"```python\n(.*?)```", README, re.DOTALL)
    exec(compile(example, "README.md", "exec"), {})
    assert capsys.readouterr().out.startswith("loss ")


def test_the_config_reference_is_generated_from_the_option_docstrings():
    from vpd_lightning import reference

    assert reference.readme_section(README) == reference.render(), (
        "README's configuration reference differs from the options' docstrings; "
        "run: .venv/bin/python -m vpd_lightning.reference --write-readme"
    )
    documented = {key for key, _, text in reference.rows() if text}
    assert len(documented) == len(reference.rows()), "an option has no docstring"


def test_the_results_section_is_rendered_from_the_committed_json(monkeypatch):
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))
    report = importlib.import_module("report")
    assert report.readme_section(README) == report.render(), (
        "README's results section differs from benchmarks/results/*.json; "
        "run: .venv/bin/python benchmarks/report.py --write-readme"
    )


def readme_commands() -> list[list[str]]:
    """The `python -m vpd_lightning ...` lines of the README's Training block, in order."""
    block = README[README.index("## Training\n\n```bash") :]
    block = block[block.index("\n") : block.index("```\n", 20)]
    commands = []
    for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("python -m vpd_lightning "):
            commands.append(shlex.split(line)[3:])
    return commands


def shortened(args: list[str]) -> list[str]:
    """The same command with fewer steps and a shorter validation (a real model stays real)."""
    if args[0] != "fit" or "--print_config" in args or "--help" in args:
        return args
    steps = "3" if "--ckpt_path" in args else "2"
    extra = ["--trainer.max_steps", steps, "--trainer.enable_progress_bar", "false"]
    if "quickstart" in " ".join(args):
        extra += ["--data.val_size", "2", "--data.prompts_per_step", "1"]
        extra += ["--model.rollout.max_new_tokens", "8", "--model.validation.max_new_tokens", "8"]
    return args + extra


@pytest.mark.slow
def test_every_readme_training_command_runs_as_written(tmp_path, monkeypatch, capsys):
    from vpd_lightning.cli import main

    commands = readme_commands()
    assert len(commands) >= 6 and any("--ckpt_path" in c for c in commands)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    for args in commands:
        try:
            main(shortened(args))
        except SystemExit as exit_info:  # --print_config and --help exit 0 after printing
            assert exit_info.code in (0, None), (args, capsys.readouterr().err[-2000:])
    assert (tmp_path / "runs/quickstart/version_0/metrics.csv").is_file()
    assert len(list((tmp_path / "runs/tiny").glob("version_*"))) == 4  # fit, grpo, validate, resume
