"""The README's promises: its Python example runs, and its config table names every option."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


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
