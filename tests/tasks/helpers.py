"""Shared by the task tests: the one skip they may take, for an OS reason only."""

from __future__ import annotations

import pytest

from vpd_lightning.tasks.sandbox.runner import launch_plan

# Skips only where this kernel forbids the sandbox's namespaces (weak mode, announced);
# test_sandbox.test_namespaces_are_used_wherever_the_kernel_allows_them fails if the kernel
# allows them and the sandbox did not use them, so the skip cannot hide a broken sandbox.
isolated_only = pytest.mark.skipif(
    not launch_plan().isolated, reason=f"sandbox in weak mode here: {launch_plan().reason}"
)
