"""The torch rows: the backend's plain log-softmax math, chunked over rows so that memory stays
O(chunk x V).

It keeps the Triton ops' contract (per-row losses plus a gradient written during the forward) but
takes the gradient of each chunk from autograd, so it doubles as a readable statement of the math
beside each kernel. Everything is computed in float32.
"""

from __future__ import annotations

import math

import torch

from vpd_kernels.checks import LossSettings
from vpd_kernels.rows import RowOutputs, rows_per_chunk

CHUNK_ELEMENTS = 1 << 20  # logits per chunk (4 MiB per float32 temporary)


def kl(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Row-wise sum of p (log p - log q), taking terms with p == 0 as 0 (0 log 0 = 0).

    The `where` keeps -inf - -inf out of both the value and the autograd graph.
    """
    return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(-1)


def divergence_rows(
    log_s: torch.Tensor, log_t: torch.Tensor, divergence: str, beta: float
) -> torch.Tensor:
    """The divergence between rows of log-probabilities log_s (student) and log_t (teacher)."""
    s, t = log_s.exp(), log_t.exp()
    if divergence == "reverse_kl":
        return kl(s, log_s, log_t)
    if divergence == "forward_kl":
        return kl(t, log_t, log_s)
    # JSD: log m = logaddexp(log(1-beta) + log s, log(beta) + log t); where s = t = 0 the inputs
    # are replaced by 0 so that logaddexp's backward never sees -inf - -inf.
    support = (s > 0) | (t > 0)
    log_m = torch.logaddexp(
        torch.where(support, log_s, 0.0) + math.log(1 - beta),
        torch.where(support, log_t, 0.0) + math.log(beta),
    )
    return beta * kl(t, log_t, log_m) + (1 - beta) * kl(s, log_s, log_m)


def distill_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    ref: torch.Tensor | None,
    coef: torch.Tensor | None,
    grad: torch.Tensor | None,
    settings: LossSettings,
    chunk_size: int | None = None,
) -> RowOutputs:
    """Per-row losses of (N, V) logits; writes coef-scaled gradients into `grad` when given."""
    n_rows, n_cols = student.shape
    out = RowOutputs.empty(n_rows, student.device)
    step = rows_per_chunk(n_cols, chunk_size, CHUNK_ELEMENTS)
    for lo in range(0, n_rows, step):
        hi = min(lo + step, n_rows)
        x = student[lo:hi].detach().float().requires_grad_(grad is not None)
        with torch.enable_grad():
            log_s = torch.log_softmax(x / settings.temperature, dim=-1)
            log_t = torch.log_softmax(teacher[lo:hi].float() / settings.temperature, dim=-1)
            div = divergence_rows(log_s, log_t, settings.divergence, settings.beta)
            ref_kl = torch.zeros_like(div)
            if ref is not None:
                log_p = torch.log_softmax(x, dim=-1)
                ref_kl = kl(log_p.exp(), log_p, torch.log_softmax(ref[lo:hi].float(), dim=-1))
            loss = div + settings.ref_coef * ref_kl
        if grad is not None:
            # Rows with coefficient 0 get exact zeros, even when their loss is NaN or inf.
            row_coef = coef[lo:hi]
            (g,) = torch.autograd.grad(loss, x, grad_outputs=row_coef)
            g = torch.where(row_coef[:, None] != 0, g, 0.0)
            grad[lo:hi] = g.to(grad.dtype)
        out.loss[lo:hi] = loss.detach()
        out.divergence[lo:hi] = div.detach()
        out.ref_kl[lo:hi] = ref_kl.detach()
        s = log_s.detach().exp()
        out.entropy[lo:hi] = -(s * torch.where(s > 0, log_s.detach(), 0.0)).sum(-1)
    return out


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(token), log-sum-exp) per row of (N, V) logits at `temperature`, float32."""
    n_rows, n_cols = logits.shape
    logp = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    step = rows_per_chunk(n_cols, chunk_size, CHUNK_ELEMENTS)
    for lo in range(0, n_rows, step):
        a = logits[lo : lo + step].float() / temperature
        lse[lo : lo + step] = torch.logsumexp(a, dim=-1)
        logp[lo : lo + step] = (
            a.gather(-1, tokens[lo : lo + step, None]).squeeze(-1) - lse[lo : lo + step]
        )
    return logp, lse


def token_logprobs_backward(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    temperature: float,
    grad: torch.Tensor,
    chunk_size: int | None = None,
) -> None:
    """Write grad_out * (onehot(token) - softmax(logits / T)) / T into `grad` (N, V)."""
    n_rows, n_cols = logits.shape
    step = rows_per_chunk(n_cols, chunk_size, CHUNK_ELEMENTS)
    for lo in range(0, n_rows, step):
        probs = torch.exp(logits[lo : lo + step].float() / temperature - lse[lo : lo + step, None])
        g = -probs
        g.scatter_add_(-1, tokens[lo : lo + step, None], torch.ones_like(g[:, :1]))
        grad[lo : lo + step] = (g * (grad_out[lo : lo + step, None] / temperature)).to(grad.dtype)
