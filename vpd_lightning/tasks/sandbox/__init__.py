"""Running model-written code: the sandboxed process, the trusted judge and the wire between them."""

from vpd_lightning.tasks.sandbox.runner import SandboxLimits, launch_plan

__all__ = ["SandboxLimits", "launch_plan"]
