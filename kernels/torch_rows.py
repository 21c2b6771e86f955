"""The torch rows: the backend's plain log-softmax math, chunked over rows so that memory stays
O(chunk x V).

It keeps the Triton ops' contract and signatures (ops/triton_rows.py: the same functions, the last
argument `tile` a backend's tuning knob, here rows per chunk; per-row outputs plus a gradient
written during the forward)
but takes the gradient of each chunk from autograd, so it doubles as a readable statement of the
math beside each kernel. Everything is computed in float32, and logits are shifted by their row
max before the temperature divides them, so the result does not depend on their offset.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from vpd_kernels.rows import RowOutputs, flat_rows, n_rows, row_chunk, rows_per_chunk
from vpd_kernels.settings import LossSettings

# Logits per chunk: 32 MiB per float32 temporary (a chunk keeps about a dozen). On a shared CPU
# fewer, larger ops matter: each op is a parallel region whose threads wait for one another, and
# a descheduled thread stalls the rest. 2**20 logits per chunk was 3x slower than this on 2 cores
# at load 5 (N=2048, V=32768, bf16 reverse KL: 25 s against 7.4 s; eager 2.9 s).
CHUNK_ELEMENTS = 1 << 23


def row_max(x: torch.Tensor) -> torch.Tensor:
    """Max of each row (keepdim), 0 for rows without a finite max (so x - max is never NaN)."""
    m = x.detach().amax(-1, keepdim=True)
    return torch.where(torch.isfinite(m), m, 0.0)


def log_softmax_at(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(x / T), with x shifted by its max first: exact at any offset of the logits."""
    return torch.log_softmax((x - row_max(x)) / temperature, dim=-1)


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


def rest_outside(log_full: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """1 - the mass at `ids` of full-vocabulary log-probabilities, summed outside the ids (not
    1 - sum: accurate also when the ids hold almost all the mass) and divided by the sum of all
    (in float64, so that neither the sums over V nor the rounding of the normaliser in
    `log_full` matter). Shape (n, 1)."""
    p = log_full.exp()
    rest = p.scatter(-1, ids, 0.0).sum(-1, keepdim=True, dtype=torch.float64)
    return (rest / p.sum(-1, keepdim=True, dtype=torch.float64)).to(p.dtype)


def rest_of_given(log_k: torch.Tensor) -> torch.Tensor:
    """1 - sum exp(log_k) for given top-k log-probs (a constant), in float64: all that the given
    log-probs say about the rest. Never below 0. Shape (n, 1)."""
    return (1 - log_k.double().exp().sum(-1, keepdim=True)).clamp_min(0.0).float()


def with_tail(log_k: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """Append the bucket of the rest (n, 1) to k log-probabilities (n, k); an empty rest is -inf,
    with a zero gradient."""
    tiny = torch.finfo(rest.dtype).tiny
    log_rest = torch.where(rest > 0, rest.clamp_min(tiny).log(), -math.inf)
    return torch.cat([log_k, log_rest], dim=-1)


def _times(coef: float, value: torch.Tensor) -> torch.Tensor:
    """coef * value, exactly 0 when coef is 0 (even where value is inf or NaN)."""
    return coef * value if coef else torch.zeros_like(value)


def _rows(
    student: torch.Tensor,
    divergence_of: Callable[[int, int, torch.Tensor], torch.Tensor],
    ref: torch.Tensor | None,
    labels: torch.Tensor | None,
    coef: torch.Tensor | None,
    grad: torch.Tensor | None,
    settings: LossSettings,
    tile: int | None,
) -> RowOutputs:
    """The rows of any distillation loss, chunk by chunk; `divergence_of(lo, hi, log_s)` gives the
    divergence of rows lo..hi from the student's log-probabilities at T."""
    total = n_rows(student)
    out = RowOutputs.empty(total, student.device)
    step = rows_per_chunk(student.shape[-1], tile, CHUNK_ELEMENTS)
    for lo in range(0, total, step):
        hi = min(lo + step, total)
        x = row_chunk(student, lo, hi).detach().float().requires_grad_(grad is not None)
        with torch.enable_grad():
            log_s = log_softmax_at(x, settings.temperature)
            div = divergence_of(lo, hi, log_s)
            ref_kl = ce = torch.zeros_like(div)
            if ref is not None or labels is not None:
                log_p = log_softmax_at(x, 1.0)
            if ref is not None:
                log_q = log_softmax_at(row_chunk(ref, lo, hi).float(), 1.0)
                ref_kl = kl(log_p.exp(), log_p, log_q)
            if labels is not None:
                ce = -log_p.gather(-1, labels[lo:hi, None]).squeeze(-1)
            loss = (
                _times(settings.div_coef, div)
                + _times(settings.ref_coef, ref_kl)
                + _times(settings.ce_coef, ce)
            )
        if grad is not None:
            # Rows with coefficient 0 get exact zeros, even when their loss is NaN or inf.
            row_coef = coef[lo:hi]
            (g,) = torch.autograd.grad(loss, x, grad_outputs=row_coef)
            flat_rows(grad)[lo:hi] = torch.where(row_coef[:, None] != 0, g, 0.0).to(grad.dtype)
        for name, value in (("loss", loss), ("divergence", div), ("ref_kl", ref_kl)):
            getattr(out, name)[lo:hi] = value.detach()
        out.cross_entropy[lo:hi] = ce.detach()
        s = log_s.detach().exp()
        out.entropy[lo:hi] = -(s * torch.where(s > 0, log_s.detach(), 0.0)).sum(-1)
    return out


def distill_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    ref: torch.Tensor | None,
    labels: torch.Tensor | None,
    coef: torch.Tensor | None,
    grad: torch.Tensor | None,
    settings: LossSettings,
    tile: int | None = None,
) -> RowOutputs:
    """Rows of (outer, inner, V) logits against the teacher's full distribution; writes
    coef-scaled gradients into `grad` (same layout) when given; the cross-entropy with `labels`."""

    def divergence_of(lo: int, hi: int, log_s: torch.Tensor) -> torch.Tensor:
        log_t = log_softmax_at(row_chunk(teacher, lo, hi).float(), settings.temperature)
        return divergence_rows(log_s, log_t, settings.divergence, settings.beta)

    return _rows(student, divergence_of, ref, labels, coef, grad, settings, tile)


def topk_rows(
    student: torch.Tensor,
    ids: torch.Tensor,
    teacher_logprobs: torch.Tensor | None,
    teacher: torch.Tensor | None,
    ref: torch.Tensor | None,
    labels: torch.Tensor | None,
    coef: torch.Tensor | None,
    grad: torch.Tensor | None,
    settings: LossSettings,
    tile: int | None = None,
) -> RowOutputs:
    """Rows against the teacher's top-k: ids (N, k) with their log-probs (N, k), or with the
    teacher's logits (outer, inner, V) normalised here; see ops/topk.py for the buckets."""

    def divergence_of(lo: int, hi: int, log_s: torch.Tensor) -> torch.Tensor:
        chunk_ids = ids[lo:hi]
        log_sk = log_s.gather(-1, chunk_ids)
        if teacher_logprobs is not None:
            log_tk = teacher_logprobs[lo:hi]
        else:
            log_t = log_softmax_at(row_chunk(teacher, lo, hi).float(), settings.temperature)
            log_tk = log_t.gather(-1, chunk_ids)
        if settings.tail:  # k + 1 buckets: the k tokens and the rest of each distribution
            log_p = with_tail(log_sk, rest_outside(log_s, chunk_ids))
            rest_t = rest_of_given(log_tk) if teacher is None else rest_outside(log_t, chunk_ids)
            log_q = with_tail(log_tk, rest_t)
        else:  # the k tokens, renormalised
            log_p, log_q = log_sk.log_softmax(-1), log_tk.log_softmax(-1)
        return divergence_rows(log_p, log_q, settings.divergence, settings.beta)

    return _rows(student, divergence_of, ref, labels, coef, grad, settings, tile)


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float, tile: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(token), normaliser) per row of (outer, inner, V) logits at `temperature`, float32;
    the normaliser (N, 2) is the row's max of the raw logits and log sum exp((x - max) / T)."""
    total = n_rows(logits)
    logp = torch.empty(total, device=logits.device, dtype=torch.float32)
    norm = torch.empty(total, 2, device=logits.device, dtype=torch.float32)
    step = rows_per_chunk(logits.shape[-1], tile, CHUNK_ELEMENTS)
    for lo in range(0, total, step):
        hi = min(lo + step, total)
        x = row_chunk(logits, lo, hi).float()
        m = row_max(x)
        a = (x - m) / temperature
        log_sum = torch.logsumexp(a, dim=-1)
        logp[lo:hi] = a.gather(-1, tokens[lo:hi, None]).squeeze(-1) - log_sum
        norm[lo:hi, 0], norm[lo:hi, 1] = m.squeeze(-1), log_sum
    return logp, norm


def token_logprobs_backward(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    norm: torch.Tensor,
    grad_out: torch.Tensor,
    temperature: float,
    grad: torch.Tensor,
    tile: int | None = None,
) -> None:
    """Write grad_out * (onehot(token) - softmax(logits / T)) / T into `grad` (like `logits`)."""
    total = n_rows(logits)
    step = rows_per_chunk(logits.shape[-1], tile, CHUNK_ELEMENTS)
    for lo in range(0, total, step):
        hi = min(lo + step, total)
        x = row_chunk(logits, lo, hi).float()
        g = -torch.exp((x - norm[lo:hi, :1]) / temperature - norm[lo:hi, 1:])
        g.scatter_add_(-1, tokens[lo:hi, None], torch.ones_like(g[:, :1]))
        flat_rows(grad)[lo:hi] = (g * (grad_out[lo:hi, None] / temperature)).to(grad.dtype)
