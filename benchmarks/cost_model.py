"""The cost model of one fused-linear distillation step on a GPU: FLOPs and HBM bytes per phase,
and the time each phase should take at a device's GEMM rates and bandwidth (a phase takes the
longer of its compute and its memory traffic). kernels/README.md shows its table for an H100;
`benchmarks/gpu_run.sh` prints it with the rates it measured beside the measured step.

The workload is the one bench_kernels.py times in fused mode: reverse KL of the student's
logits to the teacher's, plus the trust-region KL to a reference (ref_coef=0.1), the three sharing
the student's bf16 head; N tokens, vocabulary V, hidden size H, chunks of CHUNK_LOGITS float32
logits (vpd_kernels.fused_linear).

    python benchmarks/cost_model.py                      # the README's table (H100 SXM)
    python benchmarks/cost_model.py --h 2048 --bf16-tflops 640 --hbm-tbs 2.9
"""

from __future__ import annotations

import argparse
import math
from typing import NamedTuple

CHUNK_LOGITS = 1 << 26  # as vpd_kernels.fused_linear.CHUNK_LOGITS (a test keeps them equal)
VOCAB_TILE = 8192  # as vpd_kernels.fused_linear.VOCAB_TILE

# H100 SXM5 (80 GB): dense bf16 tensor cores 989 TFLOP/s, float32 (no TF32) 67 TFLOP/s, HBM3
# 3.35 TB/s. What large GEMMs and copies reach is about 70%, 75% and 90% of that.
H100 = {"bf16_tflops": 690.0, "fp32_tflops": 50.0, "hbm_tbs": 3.0}


class Phase(NamedTuple):
    name: str
    flops: float
    bytes: float
    rate: str  # "bf16" or "fp32": which GEMM rate its FLOPs run at


def phases(n: int, v: int, h: int, backward_dtype: str, streams: int = 3) -> list[Phase]:
    """The phases of forward + backward (grad_hidden, grad_weight), with `streams` models'
    logits (student, teacher, ref) per chunk and the gradient tile in `backward_dtype`."""
    rows = max(1, CHUNK_LOGITS // v)
    chunks = math.ceil(n / rows)
    gemm = 2.0 * n * v * h
    logits = float(n) * v
    head = float(v) * h
    tile = 4 if backward_dtype == "float32" else 2
    out = [
        # each chunk reads the bf16 head once per stream and writes float32 logits
        Phase(
            "forward GEMMs (logits)",
            streams * gemm,
            streams * (chunks * head * 2 + logits * 4),
            "bf16",
        ),
        # pass 1 reads student, teacher, ref; the gradient pass reads them again, writes over student
        Phase("rows kernel (loss + gradient tile)", 0.0, logits * 4 * (2 * streams + 1), "bf16"),
    ]
    if backward_dtype != "float32":
        out.append(Phase("round the tile", 0.0, logits * (4 + tile), "bf16"))
    # float32 tile: the bf16 head is upcast VOCAB_TILE rows at a time (read 2, write 4, read 4 bytes)
    head_reads = chunks * head * (2 if backward_dtype != "float32" else 10)
    rate = "bf16" if backward_dtype != "float32" else "fp32"
    out.append(Phase("grad_hidden GEMM", gemm, logits * tile + head_reads, rate))
    # grad_weight is a float32 (V, H) accumulator, read and written by every chunk's GEMM
    out.append(Phase("grad_weight GEMM", gemm, logits * tile + chunks * head * 8, rate))
    # scale by the incoming gradient and cast once: grad_weight read, written, read, bf16 written
    out.append(Phase("finish (scale, cast)", 0.0, head * (4 + 4 + 4 + 2), "bf16"))
    return out


def seconds(phase: Phase, device: dict) -> float:
    compute = phase.flops / (device[f"{phase.rate}_tflops"] * 1e12)
    return max(compute, phase.bytes / (device["hbm_tbs"] * 1e12))


def floors(n: int, v: int, h: int, device: dict, streams: int = 3) -> dict:
    """Lower bounds: the 3 + 2 GEMMs at the bf16 rate (any fused-linear implementation), and the
    HBM floor of the logits-in loss (bf16 logits of 3 models read, their gradient written once;
    bench_kernels.py's floor for logits mode)."""
    gemm = 2.0 * n * v * h
    return {
        "compute_ms": (streams + 2) * gemm / (device["bf16_tflops"] * 1e12) * 1e3,
        "hbm_logits_ms": (streams + 1) * n * v * 2 / (device["hbm_tbs"] * 1e12) * 1e3,
    }


def table(n: int, v: int, hs: list[int], device: dict) -> str:
    """Markdown: phase | FLOPs | bytes | ms per backward_dtype, for each hidden size."""
    lines = []
    for h in hs:
        lines += [
            f"N={n}, V={v}, H={h}, {max(1, CHUNK_LOGITS // v)} rows per chunk; device: "
            f"{device['bf16_tflops']:g} TFLOP/s bf16, {device['fp32_tflops']:g} TFLOP/s float32, "
            f"{device['hbm_tbs']:g} TB/s.",
            "",
            "| phase | TFLOP | GB (bf16 tile) | ms, bf16 tile | GB (float32 tile) | ms, float32 tile |",
            "|---|---|---|---|---|---|",
        ]
        by_dtype = {d: {p.name: p for p in phases(n, v, h, d)} for d in ("bfloat16", "float32")}
        total = dict.fromkeys(by_dtype, 0.0)
        for name in by_dtype["bfloat16"]:
            cells = [name, f"{by_dtype['bfloat16'][name].flops / 1e12:.1f}"]
            for dtype, by_name in by_dtype.items():
                phase = by_name.get(name)
                ms = seconds(phase, device) * 1e3 if phase else 0.0
                total[dtype] += ms
                cells += [f"{phase.bytes / 1e9:.1f}" if phase else "-", f"{ms:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        fl = floors(n, v, h, device)
        lines += [
            f"| **step** | | | **{total['bfloat16']:.0f}** | | **{total['float32']:.0f}** |",
            "",
            f"Floors: compute (3 + 2 GEMMs at the bf16 rate) {fl['compute_ms']:.0f} ms; HBM, "
            f"the logits-in loss on bf16 logits (3 read, the gradient written once) "
            f"{fl['hbm_logits_ms']:.1f} ms.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--v", type=int, default=151936)
    parser.add_argument("--h", type=int, nargs="+", default=[4096, 2048])
    parser.add_argument("--bf16-tflops", type=float, default=H100["bf16_tflops"])
    parser.add_argument("--fp32-tflops", type=float, default=H100["fp32_tflops"])
    parser.add_argument("--hbm-tbs", type=float, default=H100["hbm_tbs"])
    args = parser.parse_args()
    device = {
        "bf16_tflops": args.bf16_tflops,
        "fp32_tflops": args.fp32_tflops,
        "hbm_tbs": args.hbm_tbs,
    }
    print(table(args.n, args.v, args.h, device), end="")


if __name__ == "__main__":
    main()
