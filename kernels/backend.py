"""Backend choice: which implementation computes the rows (the Triton ops or the torch rows),
whether it can run where the tensors are, and the route of a distillation (full vocabulary or
top-k ids). The autograd Functions above take a `Backend`; the backends below know nothing of it."""

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
class Targets:
    """What the student's rows are compared with; no gradient flows into any of them. The
    teacher as logits rows (outer, inner, V), or as top-k `ids` (N, k) with `teacher_logprobs`
    (N, k); the ref's logits rows; label ids (N,) for the cross-entropy."""

    teacher: torch.Tensor | None = None
    ref: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    teacher_logprobs: torch.Tensor | None = None


@dataclass(frozen=True)
class Backend:
    """The module that computes the rows, torch_rows or ops.triton_rows (the same functions with
    the same signatures), and its tuning knob `tile`: rows per chunk for torch, the vocabulary
    tile (a power of two) for Triton; None picks a default from the vocabulary size."""

    rows_module: ModuleType
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

    def rows(
        self,
        student: torch.Tensor,
        targets: Targets,
        coef: torch.Tensor | None,
        grad: torch.Tensor | None,
        settings: LossSettings,
    ) -> RowOutputs:
        """Rows of (outer, inner, V) student logits against `targets`, writing coef-scaled
        gradients into `grad` (same layout; it may be `student` itself). The route: the full
        vocabulary; given top-k ids; or, with `settings.teacher_topk`, the top k of the teacher
        (or of the student, `settings.topk_from`), whose ids are chosen here (no gradient)."""
        t = targets
        if t.ids is None and settings.teacher_topk is None:
            return self.rows_module.distill_rows(
                student, t.teacher, t.ref, t.labels, coef, grad, settings, self.tile
            )
        ids = t.ids
        if ids is None:
            chunk = rows_per_chunk(t.teacher.shape[-1], None, TOPK_CHUNK_ELEMENTS)
            ranked = t.teacher if settings.topk_from == "teacher" else student.detach()
            ids = top_ids(ranked, settings.teacher_topk, chunk)
        return self.rows_module.topk_rows(
            student, ids, t.teacher_logprobs, t.teacher, t.ref, t.labels, coef, grad, settings,
            self.tile,
        )  # fmt: skip

    def logprobs(
        self, logits: torch.Tensor, tokens: torch.Tensor, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rows_module.token_logprobs(logits, tokens, temperature, self.tile)

    def logprobs_backward(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        norm: torch.Tensor,
        grad_out: torch.Tensor,
        temperature: float,
        grad: torch.Tensor,
    ) -> None:
        self.rows_module.token_logprobs_backward(
            logits, tokens, norm, grad_out, temperature, grad, self.tile
        )
