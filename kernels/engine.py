"""Backend dispatch: one object that runs the row kernels with either Triton or torch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vpd_kernels import reference
from vpd_kernels.config import DistillConfig, RowOutputs


@dataclass(frozen=True)
class Engine:
    """Runs per-row kernels on (N, V) logits with `backend` ("triton" or "torch").

    `block_v` (Triton vocabulary tile, a power of two) and `chunk_size` (torch backend rows per
    chunk) are tuning knobs; None picks a default from the vocabulary size.
    """

    backend: str
    block_v: int | None = None
    chunk_size: int | None = None

    def distill_rows(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        ref: torch.Tensor | None,
        coef: torch.Tensor | None,
        grad: torch.Tensor | None,
        cfg: DistillConfig,
    ) -> RowOutputs:
        if self.backend == "triton":
            from vpd_kernels.ops.distill import distill_rows_triton

            return distill_rows_triton(student, teacher, ref, coef, grad, cfg, block_v=self.block_v)
        return reference.distill_rows_torch(
            student, teacher, ref, coef, grad, cfg, chunk_size=self.chunk_size
        )

    def logprobs(
        self, logits: torch.Tensor, tokens: torch.Tensor, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.backend == "triton":
            from vpd_kernels.ops.logprobs import token_logprobs_triton

            return token_logprobs_triton(logits, tokens, temperature, block_v=self.block_v)
        return reference.token_logprobs_torch(
            logits, tokens, temperature, chunk_size=self.chunk_size
        )

    def logprobs_backward(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        lse: torch.Tensor,
        grad_out: torch.Tensor,
        temperature: float,
        grad: torch.Tensor,
    ) -> None:
        if self.backend == "triton":
            from vpd_kernels.ops.logprobs import token_logprobs_backward_triton

            token_logprobs_backward_triton(
                logits, tokens, lse, grad_out, temperature, grad, block_v=self.block_v
            )
        else:
            reference.token_logprobs_backward_torch(
                logits, tokens, lse, grad_out, temperature, grad, chunk_size=self.chunk_size
            )
