"""The layers of `vpd_lightning` and the independence of `vpd_kernels`, checked by import-linter
with the contracts in pyproject.toml (the same check `make lint` runs)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

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


def test_an_upward_import_breaks_the_contracts(tmp_path):
    """The contracts can fail: a copy of the package where the policy imports the trainer."""
    copy = tmp_path / "vpd_lightning"
    subprocess.run(["cp", "-r", str(ROOT / "vpd_lightning"), str(copy)], check=True)
    subprocess.run(["cp", "-r", str(ROOT / "kernels"), str(tmp_path / "vpd_kernels")], check=True)
    roles = copy / "policy" / "roles.py"
    roles.write_text(roles.read_text() + "\nimport vpd_lightning.trainer.module  # upward\n")
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
    assert "vpd_lightning.policy.roles -> vpd_lightning.trainer.module" in textwrap.dedent(
        result.stdout
    )
