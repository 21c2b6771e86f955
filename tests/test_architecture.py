"""The layers of `vpd_lightning` and of `vpd_kernels`, and the independence of `vpd_kernels`,
checked by import-linter with the contracts in pyproject.toml (the same check `make lint` runs)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def run_contracts(cwd: Path, config: Path | None = None) -> subprocess.CompletedProcess:
    args = [str(LINT_IMPORTS), "--no-cache"]
    if config is not None:
        args += ["--config", str(config)]
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_import_contracts_hold():
    result = run_contracts(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


# (file to plant the import in, the upward import, the line import-linter reports)
UPWARD = {
    "policy imports the trainer": (
        "vpd_lightning/policy/roles.py",
        "import vpd_lightning.trainer.module",
        "vpd_lightning.policy.roles -> vpd_lightning.trainer.module",
    ),
    "a Triton launcher imports the backend choice": (
        "vpd_kernels/ops/distill.py",
        "import vpd_kernels.backend",
        "vpd_kernels.ops.distill -> vpd_kernels.backend",
    ),
    "the rows import an autograd Function": (
        "vpd_kernels/rows.py",
        "import vpd_kernels.functions",
        "vpd_kernels.rows -> vpd_kernels.functions",
    ),
}


@pytest.mark.parametrize("case", UPWARD)
def test_an_upward_import_breaks_the_contracts(tmp_path, case):
    """The contracts can fail: a copy of the packages with one import planted upward."""
    path, line, reported = UPWARD[case]
    subprocess.run(["cp", "-r", str(ROOT / "vpd_lightning"), str(tmp_path)], check=True)
    subprocess.run(["cp", "-r", str(ROOT / "kernels"), str(tmp_path / "vpd_kernels")], check=True)
    planted = tmp_path / path
    planted.write_text(planted.read_text() + f"\n{line}  # upward\n")
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    result = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0
    assert reported in textwrap.dedent(result.stdout), result.stdout
