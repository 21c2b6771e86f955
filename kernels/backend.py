"""Backend choice: which implementation computes the rows (the Triton ops or the torch rows), and
whether it can run where the tensors are."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from vpd_kernels import torch_rows
from vpd_kernels.checks import LossSettings
from vpd_kernels.ops import HAVE_TRITON
from vpd_kernels.ops.distill import distill_rows_triton
from vpd_kernels.ops.logprobs import token_logprobs_backward_triton, token_logprobs_triton
from vpd_kernels.ops.topk import topk_rows_triton
from vpd_kernels.rows import RowOutputs, rows_per_chunk, top_ids

BACKENDS = ("auto", "triton", "torch")
TOPK_CHUNK_ELEMENTS = 1 << 24  # logits per sort that picks the top-k ids (`teacher_topk`)


def resolve(backend: str, device: torch.device) -> str:
    """Pick "triton" or "torch" for tensors on `device`; explain how to fix impossible requests."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and HAVE_TRITON else "torch"
    if not HAVE_TRITON:
        raise ValueError(
            "backend='triton' needs the triton package; install it or use backend='torch'"
        )
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    raise ValueError(
        f"backend='triton' got tensors on {device}: move them to a CUDA device, use backend='torch', "
        "or (CPU only, slow) set TRITON_INTERPRET=1 in the environment before triton is imported"
    )


@dataclass(frozen=True)
class Backend:
    """Runs the per-row computations on (N, V) logits with `name` ("triton" or "torch").

    `block_v` (Triton vocabulary tile, a power of two) and `chunk_size` (torch rows per chunk) are
    tuning knobs; None picks a default from the vocabulary size.
    """

    name: str
    block_v: int | None = None
    chunk_size: int | None = None

    @classmethod
    def choose(
        cls,
        backend: str,
        device: torch.device,
        block_v: int | None = None,
        chunk_size: int | None = None,
    ) -> Backend:
        return cls(resolve(backend, device), block_v, chunk_size)

    def distill_rows(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        ref: torch.Tensor | None,
        labels: torch.Tensor | None,
        coef: torch.Tensor | None,
        grad: torch.Tensor | None,
        settings: LossSettings,
    ) -> RowOutputs:
        """Rows of (outer, inner, V) student logits against the teacher's logits (same layout):
        its full distribution, or the top `settings.teacher_topk` tokens of the teacher (or of
        the student, with `settings.topk_from`; ids carry no gradient either way)."""
        if settings.teacher_topk is not None:
            chunk = rows_per_chunk(teacher.shape[-1], None, TOPK_CHUNK_ELEMENTS)
            ranked = teacher if settings.topk_from == "teacher" else student.detach()
            ids = top_ids(ranked, settings.teacher_topk, chunk)
            return self.topk_rows(student, ids, None, teacher, ref, labels, coef, grad, settings)
        if self.name == "triton":
            return distill_rows_triton(
                student, teacher, ref, labels, coef, grad, settings, self.block_v
            )
        return torch_rows.distill_rows(
            student, teacher, ref, labels, coef, grad, settings, self.chunk_size
        )

    def topk_rows(
        self,
        student: torch.Tensor,
        ids: torch.Tensor,
        teacher_logprobs: torch.Tensor | None,
        teacher: torch.Tensor | None,
        ref: torch.Tensor | None,
        labels: torch.Tensor | None,
        coef: torch.Tensor | None,
        grad: torch.Tensor | None,
        settings: LossSettings,
    ) -> RowOutputs:
        """Rows against the teacher's top-k ids (N, k), with their log-probs or its logits."""
        args = (student, ids, teacher_logprobs, teacher, ref, labels, coef, grad, settings)
        if self.name == "triton":
            return topk_rows_triton(*args, self.block_v)
        return torch_rows.topk_rows(*args, self.chunk_size)

    def logprobs(
        self, logits: torch.Tensor, tokens: torch.Tensor, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.name == "triton":
            return token_logprobs_triton(logits, tokens, temperature, self.block_v)
        return torch_rows.token_logprobs(logits, tokens, temperature, self.chunk_size)

    def logprobs_backward(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        norm: torch.Tensor,
        grad_out: torch.Tensor,
        temperature: float,
        grad: torch.Tensor,
    ) -> None:
        if self.name == "triton":
            token_logprobs_backward_triton(
                logits, tokens, norm, grad_out, temperature, grad, self.block_v
            )
        else:
            torch_rows.token_logprobs_backward(
                logits, tokens, norm, grad_out, temperature, grad, self.chunk_size
            )
