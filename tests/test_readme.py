"""The README's promises: its Python example runs, and its config table names every option."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from pathlib import Path

from vpd_lightning import config
from vpd_lightning.data import VPDDataModule
from vpd_lightning.module import VPDModule

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_the_kernels_example_runs(capsys):
    (example,) = re.findall(r"```python\n(.*?)```", README, re.DOTALL)
    exec(compile(example, "README.md", "exec"), {})
    assert capsys.readouterr().out.startswith("loss ")


def test_the_config_reference_names_every_option():
    table = README[README.index("### Configuration reference") :]
    table = table[: table.index("### Configs")]
    missing = []
    for prefix, cls in (("model", VPDModule), ("data", VPDDataModule)):
        for name in inspect.signature(cls.__init__).parameters:
            if name not in ("self", "task") and f"`{prefix}.{name}`" not in table:
                missing.append(f"{prefix}.{name}")
    for group in (
        config.RolloutOptions,
        config.DistillOptions,
        config.EStepOptions,
        config.SdpoOptions,
        config.GrpoOptions,
        config.ValidationOptions,
        config.LoraOptions,
    ):
        for field in dataclasses.fields(group):
            if f"`{field.name}`" not in table and f"{field.name}," not in table:
                missing.append(f"{group.__name__}.{field.name}")
    assert not missing, f"README's configuration reference lacks {missing}"


def test_the_results_section_is_rendered_from_the_committed_json(monkeypatch):
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))
    report = importlib.import_module("report")
    assert report.readme_section(README) == report.render(), (
        "README's results section differs from benchmarks/results/*.json; "
        "run: .venv/bin/python benchmarks/report.py --write-readme"
    )
