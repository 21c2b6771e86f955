"""kernels/README.md's examples run: the first one and every block of the "Use it ..." sections;
its precision table is the one the committed benchmark JSON renders."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "kernels" / "README.md").read_text()


def examples(heading: str | None) -> list[str]:
    """The python blocks of the section `heading` (None: the first block of the file)."""
    if heading is None:
        return [re.search(r"```python\n(.*?)```", README, re.DOTALL).group(1)]
    text = README[README.index(f"## {heading}\n") + 3 :]
    text = text[: text.index("\n## ")]
    return re.findall(r"```python\n(.*?)```", text, re.DOTALL)


@pytest.mark.filterwarnings("ignore")  # TRL warns that GKDTrainer is experimental
@pytest.mark.parametrize(
    "heading", [None, "Use it in TRL", "Use it in Liger's place", "Use it in your own loop"]
)
def test_example_runs(heading, capsys, monkeypatch):
    if heading == "Use it in TRL":  # the example replaces TRL's loss: undone after the test
        import trl.trainer.distillation_trainer as distillation_trainer

        original = distillation_trainer._chunked_divergence_loss
        monkeypatch.setattr(distillation_trainer, "_chunked_divergence_loss", original)
    blocks = examples(heading)
    assert blocks
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, f"kernels/README.md ({heading})", "exec"), namespace)
        assert namespace["loss"].requires_grad
    if heading == "Use it in TRL":
        from vpd_kernels.compat.trl import chunked_divergence_loss

        assert distillation_trainer._chunked_divergence_loss is chunked_divergence_loss


def test_precision_table_is_the_benchmarks(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = importlib.import_module("bench_kernels")
    payload = json.loads((ROOT / "benchmarks" / "results" / "kernels-cpu.json").read_text())
    begin, end = "<!-- precision:begin -->\n", "<!-- precision:end -->"
    table = README[README.index(begin) + len(begin) : README.index(end)]
    assert table == bench.precision_markdown(payload)
