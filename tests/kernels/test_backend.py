"""Backend choice: what runs where, and the messages when the request cannot run."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import vpd_kernels as vk
from vpd_kernels.backend import resolve

S = torch.randn(2, 3, 5)


def test_auto_is_torch_on_cpu_and_unknown_names_are_refused():
    assert resolve("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        vk.distill_loss(S, S, backend="cuda")


def test_triton_on_cpu_outside_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"TRITON_INTERPRET=1"):
        vk.distill_loss(S, S, backend="triton")
    with pytest.raises(ValueError, match="backend='torch'"):
        vk.token_logprobs(S, torch.zeros(2, 3, dtype=torch.long), backend="triton")


def test_without_triton_the_torch_backend_still_runs():
    """Where triton is not installed (macOS, Windows) the package imports and runs on torch."""
    script = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch
import vpd_kernels as vk
x = torch.randn(3, 7, requires_grad=True)
vk.distill_loss(x, torch.randn(3, 7)).backward()
assert x.grad is not None
try:
    vk.distill_loss(x, torch.randn(3, 7), backend="triton")
except ValueError as err:
    print(err)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "needs the triton package" in done.stdout
