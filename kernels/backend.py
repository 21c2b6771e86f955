"""Backend choice: which implementation computes the rows (the Triton ops or the torch rows), and
whether it can run where the tensors are."""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType

import torch

from vpd_kernels import torch_rows
from vpd_kernels.ops import HAVE_TRITON, triton_rows
from vpd_kernels.rows import RowOutputs, rows_per_chunk, top_ids
from vpd_kernels.settings import LossSettings

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
    """The module that computes the rows, torch_rows or ops.triton_rows (the same functions with
    the same signatures), and its tuning knob `tile`: rows per chunk for torch, the vocabulary
    tile (a power of two) for Triton; None picks a default from the vocabulary size."""

    rows: ModuleType
    tile: int | None = None

    @classmethod
    def choose(
        cls,
        backend: str,
        device: torch.device,
        block_v: int | None = None,
        chunk_size: int | None = None,
    ) -> Backend:
        if resolve(backend, device) == "triton":
            return cls(triton_rows, block_v)
        return cls(torch_rows, chunk_size)

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
        the route is the full vocabulary, or with `settings.teacher_topk` the top k of the
        teacher (or of the student, `settings.topk_from`), whose ids are chosen here (no
        gradient) and whose tails both distributions' logits give."""
        if settings.teacher_topk is None:
            return self.rows.distill_rows(
                student, teacher, ref, labels, coef, grad, settings, self.tile
            )
        chunk = rows_per_chunk(teacher.shape[-1], None, TOPK_CHUNK_ELEMENTS)
        ranked = teacher if settings.topk_from == "teacher" else student.detach()
        ids = top_ids(ranked, settings.teacher_topk, chunk)
        return self.topk_rows(student, ids, None, teacher, ref, labels, coef, grad, settings)

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
        """Rows against top-k ids (N, k), with the teacher's log-probs there or its logits."""
        args = (
            student,
            ids,
            teacher_logprobs,
            teacher,
            ref,
            labels,
            coef,
            grad,
            settings,
        )
        return self.rows.topk_rows(*args, self.tile)

    def logprobs(
        self, logits: torch.Tensor, tokens: torch.Tensor, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rows.token_logprobs(logits, tokens, temperature, self.tile)

    def logprobs_backward(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        norm: torch.Tensor,
        grad_out: torch.Tensor,
        temperature: float,
        grad: torch.Tensor,
    ) -> None:
        self.rows.token_logprobs_backward(
            logits, tokens, norm, grad_out, temperature, grad, self.tile
        )
