"""Fused-linear losses: the autograd Functions that make logits = hidden @ weight.T (+ bias)
chunk by chunk, exactly in bf16 and fp16, around either backend's rows.

There is no kernel of its own here: each chunk's logits come from a torch matmul with a float32
result, the distillation (or log-prob) rows of the chosen `Backend` turn them into per-row values
and overwrite the chunk with its float32 gradient, and two more matmuls fold that into
grad_hidden and grad_weight (grad_bias is a float32 sum), accumulated in float32 and cast once, at
the end, after the scaling by the incoming gradient. The logits are never rounded: self-
distillation, where teacher and student differ by ~1e-3, needs it (bf16 logits would round away
the very difference the loss measures). The gradient tile may be: `backward_dtype` bf16 / fp16
rounds the tile (p_s - p_t, whose relative precision survives the rounding) once, so that the two
backward GEMMs run on tensor cores with float32 accumulation, as TRL 1.16 does; float32 keeps it
exact at the price of float32 GEMMs. Peak memory is a few float32 chunks of logits plus the
float32 gradients, never (N, V). With `teacher_topk` the top-k is taken chunk by chunk too.

Heads may transform their logits, as Cohere (`logit_scale`) and Gemma 2/3
(`final_logit_softcapping`) do: z = cap * tanh(scale * logits / cap) (just scale * logits
without a cap). The rows see z; the gradient is chained back through dz/dlogits here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vpd_kernels.backend import Backend, Targets
from vpd_kernels.rows import RowOutputs, n_rows, reduce_rows, row_chunk, row_coefficients
from vpd_kernels.settings import LossSettings

# Float32 logits per chunk: 256 MiB per stream (student, teacher, ref), as 2**27 bf16 logits cost
# before the logits became float32 (about 440 rows at V=152k).
CHUNK_LOGITS = 1 << 26
# Head rows upcast at a time where no matmul with a float32 result exists for low-precision
# inputs (CPU, torch < 2.8): 8192 x H floats (128 MiB at H = 4096).
VOCAB_TILE = 8192
_MM_OUT_DTYPE = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 8)


def _fp32_out(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether torch.mm(a, b, out_dtype=float32) runs here (CUDA, same low-precision dtypes)."""
    return _MM_OUT_DTYPE and a.is_cuda and a.dtype == b.dtype != torch.float32


def mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as float32, never rounded to the inputs' dtype: a float32-output matmul where the
    device has one, else on float32 copies (callers keep one operand small: a vocabulary tile)."""
    if _fp32_out(a, b):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def addmm32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """acc += alpha * a @ b for a float32 `acc`, the product never rounded to the inputs' dtype:
    one float32-output GEMM (tensor cores, float32 accumulation) where the device has one, else
    on float32 copies (callers keep one operand small: a vocabulary tile or a chunk of rows)."""
    if _fp32_out(a, b):
        torch.addmm(acc, a, b, alpha=alpha, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float(), alpha=alpha)


def backward_dtype_for(requested: torch.dtype | None, weight: torch.Tensor) -> torch.dtype:
    """The gradient tile's dtype in the backward GEMMs: `requested`, or by default the weight's
    low-precision dtype where a float32-output GEMM makes that fast (CUDA, torch >= 2.8), else
    float32 (on a CPU rounding the tile only costs precision)."""
    if requested is not None:
        return requested
    fast = _MM_OUT_DTYPE and weight.is_cuda and weight.dtype != torch.float32
    return weight.dtype if fast else torch.float32


def gradient_tile(grad: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """The float32 gradient tile in `dtype`, and the factor that undoes its scaling (alpha).

    bfloat16 has float32's range: one rounding. float16 does not (a mean over 16k tokens puts
    entries near 1e-9, below its smallest subnormal 6e-8), so the tile is first scaled in place by
    a power of two that brings its largest entry just under 2**14 (exact; one host read).
    """
    if dtype == torch.float32:
        return grad, 1.0
    if dtype == torch.float16:
        largest = float(grad.abs().max())
        if largest > 0 and math.isfinite(largest):
            shift = 14 - math.frexp(largest)[1]
            return grad.mul_(2.0**shift).to(dtype), 2.0**-shift
    return grad.to(dtype), 1.0


def _vocab_tiles(a: torch.Tensor, weight: torch.Tensor):
    """Slices of the vocabulary to multiply `a` with `weight`'s rows by: one slice when no
    operand needs a float32 copy, else VOCAB_TILE rows so that the copy stays small."""
    step = (
        weight.shape[0]
        if _fp32_out(a, weight) or weight.dtype == a.dtype == torch.float32
        else VOCAB_TILE
    )
    return [slice(v, v + step) for v in range(0, weight.shape[0], step)]


@dataclass(frozen=True)
class Head:
    """An LM head and its logit transform: z = softcap * tanh(scale * (h @ weight.T + bias) /
    softcap), or scale * (h @ weight.T + bias) when `softcap` is None."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    def logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(z, dz/dlogits / scale) for rows of `hidden`, float32: the slope is None without a cap
        (the scale alone is applied to the gradient), else 1 - tanh^2, an extra float32 chunk."""
        z = torch.empty(
            hidden.shape[0], self.weight.shape[0], device=hidden.device, dtype=torch.float32
        )
        for cols in _vocab_tiles(hidden, self.weight):
            z[:, cols] = mm32(hidden, self.weight[cols].T)
        if self.bias is not None:
            z += self.bias.float()
        if self.scale != 1.0:
            z *= self.scale
        if self.softcap is None:
            return z, None
        z.div_(self.softcap).tanh_()
        slope = 1.0 - z.square()
        return z.mul_(self.softcap), slope

    def chain(self, grad_z: torch.Tensor, slope: torch.Tensor | None) -> torch.Tensor:
        """d loss / d logits from d loss / d z (in place on `grad_z`)."""
        if slope is not None:
            grad_z *= slope
        return grad_z.mul_(self.scale) if self.scale != 1.0 else grad_z

    def backprop(self, grad_logits, hidden, grads, lo: int, hi: int, dtype: torch.dtype) -> None:
        """Fold float32 d loss / d logits of rows lo..hi into the float32 gradient buffers
        (grad_hidden, grad_weight, grad_bias; None where not wanted), the tile in `dtype` in the
        two GEMMs (see gradient_tile; it may overwrite `grad_logits`)."""
        grad_h, grad_w, grad_b = grads
        if grad_b is not None:
            grad_b += grad_logits.sum(0)
        if grad_h is None and grad_w is None:
            return
        tile, alpha = gradient_tile(grad_logits, dtype)
        if grad_h is not None:
            for cols in _vocab_tiles(tile, self.weight):
                addmm32(grad_h[lo:hi], tile[:, cols], self.weight[cols], alpha)
        if grad_w is not None:
            addmm32(grad_w, tile.T, hidden, alpha)


@dataclass(frozen=True)
class Constants:
    """What the student's gradient does not flow into: teacher and ref (hidden rows as
    (outer, inner, H) views, heads), labels (N,) for the cross-entropy, and the settings. The
    student's transform (scale, softcap) rides here too; its weight and bias are inputs.
    `backward_dtype` is the gradient tile's dtype in the backward GEMMs (backward_dtype_for)."""

    teacher_hidden: torch.Tensor
    teacher: Head
    ref_hidden: torch.Tensor | None
    ref: Head
    labels: torch.Tensor | None
    settings: LossSettings
    backend: Backend
    chunk: int
    backward_dtype: torch.dtype
    student_scale: float = 1.0
    student_softcap: float | None = None


def _distill_chunks(sh, sw, sb, coef, c: Constants, grad_h, grad_w, grad_b) -> RowOutputs:
    """Per-row outputs for all rows; accumulates coef-scaled float32 gradients into grad_h /
    grad_w / grad_b (those that are not None)."""
    total = n_rows(sh)
    out = RowOutputs.empty(total, sh.device)
    student = Head(sw, sb, c.student_scale, c.student_softcap)
    grads = (grad_h, grad_w, grad_b)
    write_grad = any(g is not None for g in grads)
    for lo in range(0, total, c.chunk):
        hi = min(lo + c.chunk, total)
        hidden = row_chunk(sh, lo, hi)
        logits, slope = student.logits(hidden)
        teacher, _ = c.teacher.logits(row_chunk(c.teacher_hidden, lo, hi))
        ref = None
        if c.ref_hidden is not None:
            ref = c.ref.logits(row_chunk(c.ref_hidden, lo, hi))[0][:, None]
        labels = c.labels[lo:hi] if c.labels is not None else None
        rows = c.backend.rows(
            logits[:, None],
            Targets(teacher[:, None], ref, labels),
            coef[lo:hi],
            logits[:, None] if write_grad else None,  # the gradient overwrites the logits
            c.settings,
        )
        del teacher, ref
        for dst, src in zip(out, rows, strict=True):
            dst[lo:hi] = src
        if write_grad:
            grad_logits = student.chain(logits, slope)
            student.backprop(grad_logits, hidden, grads, lo, hi, c.backward_dtype)
    return out


def _new_grads(sh, sw, sb, need) -> tuple[torch.Tensor | None, ...]:
    """Float32 buffers for grad_hidden (N, H), grad_weight and grad_bias (summed over chunks)."""
    f32 = dict(device=sh.device, dtype=torch.float32)  # never the default dtype (bf16-true sets it)
    return (
        torch.zeros(n_rows(sh), sh.shape[-1], **f32) if need[0] else None,
        torch.zeros(sw.shape, **f32) if need[1] else None,
        torch.zeros(sb.shape, **f32) if sb is not None and need[2] else None,
    )


def _finish(grads, like, grad_loss: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Scale the float32 gradients by the incoming scalar gradient and cast each once to the
    dtype (and, for grad_hidden, the shape) of its input."""
    out = []
    for g, x in zip(grads, like, strict=True):
        if g is not None:
            if grad_loss is not None:
                g = g.mul_(grad_loss.float())
            g = g.view(x.shape).to(x.dtype)
        out.append(g)
    return tuple(out)


class FusedLinearDistillFunction(torch.autograd.Function):
    """Gradients in the forward for "mean"/"sum"; recomputed in backward for "none" (per-row grad)."""

    @staticmethod
    def forward(ctx, sh, sw, sb, weights, c: Constants):
        need = ctx.needs_input_grad[:3]
        early = c.settings.reduction != "none"
        grads = _new_grads(sh, sw, sb, need) if early else (None, None, None)
        coef = row_coefficients(weights, c.settings.reduction)
        rows = _distill_chunks(sh, sw, sb, coef, c, *grads)
        ctx.grads_ready = early
        ctx.like = (sh, sw, sb)
        if early:
            ctx.save_for_backward(*grads)
        else:
            ctx.save_for_backward(sh, sw, sb, weights)
            ctx.constants = c
        stats = rows[1:]
        ctx.mark_non_differentiable(*stats)
        return (reduce_rows(rows.loss, weights, c.settings.reduction), *stats)

    @staticmethod
    def backward(ctx, grad_loss, *_stats_grads):
        if ctx.grads_ready:
            grads = _finish(ctx.saved_tensors, ctx.like, grad_loss)
        else:
            sh, sw, sb, weights = ctx.saved_tensors
            grads = _new_grads(sh, sw, sb, ctx.needs_input_grad[:3])
            _distill_chunks(sh, sw, sb, weights * grad_loss.float(), ctx.constants, *grads)
            grads = _finish(grads, (sh, sw, sb), None)
        return *grads, None, None


class FusedLinearLogprobsFunction(torch.autograd.Function):
    """Forward keeps only the per-row normaliser; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        tokens,
        transform,
        temperature: float,
        backend: Backend,
        chunk: int,
        backward_dtype: torch.dtype,
    ):
        total = n_rows(hidden)
        logp = torch.empty(total, device=hidden.device, dtype=torch.float32)
        norm = torch.empty(total, 2, device=hidden.device, dtype=torch.float32)
        head = Head(weight, bias, *transform)
        for lo in range(0, total, chunk):
            hi = min(lo + chunk, total)
            z, _ = head.logits(row_chunk(hidden, lo, hi))
            logp[lo:hi], norm[lo:hi] = backend.logprobs(z[:, None], tokens[lo:hi], temperature)
        ctx.save_for_backward(hidden, weight, bias, tokens, norm)
        ctx.transform, ctx.temperature, ctx.backend = transform, temperature, backend
        ctx.chunk, ctx.backward_dtype = chunk, backward_dtype
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, bias, tokens, norm = ctx.saved_tensors
        head = Head(weight, bias, *ctx.transform)
        grads = _new_grads(hidden, weight, bias, ctx.needs_input_grad[:3])
        grad_logp = grad_logp.contiguous()
        total = n_rows(hidden)
        for lo in range(0, total, ctx.chunk):
            hi = min(lo + ctx.chunk, total)
            chunk_hidden = row_chunk(hidden, lo, hi)
            z, slope = head.logits(chunk_hidden)
            ctx.backend.logprobs_backward(
                z[:, None],
                tokens[lo:hi],
                norm[lo:hi],
                grad_logp[lo:hi],
                ctx.temperature,
                z[:, None],
            )  # the float32 gradient overwrites the logits chunk in place
            head.backprop(head.chain(z, slope), chunk_hidden, grads, lo, hi, ctx.backward_dtype)
        return *_finish(grads, (hidden, weight, bias), None), None, None, None, None, None, None
