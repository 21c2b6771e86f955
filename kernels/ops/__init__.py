"""The Triton backend: each file holds its kernels and their launchers (triton_rows.py names the
launchers as torch_rows names its functions); tiles.py the helpers they share. Nothing here knows
autograd or the backend choice: both sit above (functions.py, fused_linear.py, backend.py).

Triton is absent on macOS and Windows. There `triton` and `tl` below are inert stand-ins so that
the kernels still import and the torch rows run; `backend.resolve` refuses backend="triton".
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

    class _NoTriton:
        """Just enough of triton / triton.language to define (never launch) the kernels."""

        @staticmethod
        def jit(fn):
            return fn

        @staticmethod
        def constexpr(value):
            return value

    triton = tl = _NoTriton()

__all__ = ["HAVE_TRITON", "tl", "triton"]
