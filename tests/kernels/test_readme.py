"""kernels/README.md's examples run: the first one and the three "Use it ..." sections."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[2] / "kernels" / "README.md").read_text()


def example(heading: str | None) -> str:
    """The first python block after `heading` (None: the first of the file)."""
    text = README if heading is None else README[README.index(f"## {heading}\n") :]
    return re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)


@pytest.mark.filterwarnings("ignore")  # TRL warns that GKDTrainer is experimental
@pytest.mark.parametrize(
    "heading", [None, "Use it in TRL", "Use it in Liger's place", "Use it in your own loop"]
)
def test_example_runs(heading, capsys):
    namespace: dict = {}
    exec(compile(example(heading), f"kernels/README.md ({heading})", "exec"), namespace)
    assert namespace["loss"].requires_grad
