"""The Triton ops: each file holds its kernels, their launchers and the autograd Function that
runs them (the Function also runs the torch rows when the backend is "torch").

Triton is absent on macOS and Windows. There `triton` and `tl` below are inert stand-ins so that
the Functions still import and run the torch rows; `backend.resolve` refuses backend="triton".
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
