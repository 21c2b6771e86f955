"""What bounds a step on this machine: the network's own cost, measured apart from the trainer.

Where a speed goal of issue 22 is missed, its bound is to be measured, not guessed. On the model
and batch of `train_step.py --compare` (SmolLM2-135M, 4 prompts x 4 samples, 48 tokens, float32):
- rollout: the cached engine's wall time, and the part of it inside the network's forwards (a
  timer around each); the rest is the engine itself (sampling, cache bookkeeping, Python). Each
  forward is set against its floor: the larger of streaming the weights once (their bytes at the
  traffic rate of a large copy) and its matmul FLOPs (2 x parameters x rows) at the measured
  float32 GEMM rate. Hooks time the `nn.Linear` calls apart, and the rate at which they read
  their weights (the prefill included) is set against the copy rate.
- update: one forward of the decoder over the step's 16 sequences in micro-batches of 8, as the
  trainer pads them, against its FLOPs at the GEMM rate of that shape.

    .venv/bin/python benchmarks/floor.py          # prints a table, writes results/floor-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_kernels import time_steps

from vpd_lightning.options import SamplingParams
from vpd_lightning.policy.models import (
    SMOLLM2_ALIAS,
    generation_eos_ids,
    load_causal_lm,
    load_tokenizer,
)
from vpd_lightning.rollout.cached import CachedEngine
from vpd_lightning.rollout.prompts import render_prompt
from vpd_lightning.tasks import ArithmeticTask

RESULTS = Path(__file__).parent / "results"
PROMPTS, SAMPLES, MAX_NEW_TOKENS, MICRO_BATCH = 4, 4, 48, 8


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    return statistics.median(time_steps(fn, repeats, "cpu")) / 1e3


def gemm_flops_per_s(m: int, k: int, n: int) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    return 2 * m * k * n / median_seconds(lambda: a @ b, repeats=9)


def copy_bytes_per_s(mib: int = 512) -> float:
    """Bytes read plus written per second by one large float32 copy."""
    src = torch.randn(mib * 2**18)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / median_seconds(lambda: dst.copy_(src), repeats=5)


class LinearTimer:
    """Seconds spent inside the network's `nn.Linear` calls (its matmuls), by forward hooks."""

    def __init__(self, network: torch.nn.Module) -> None:
        self.seconds, self._start = 0.0, 0.0
        for module in network.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_pre_hook(self._enter)
                module.register_forward_hook(self._leave)

    def _enter(self, *_) -> None:
        self._start = time.perf_counter()

    def _leave(self, *_) -> None:
        self.seconds += time.perf_counter() - self._start


class TimedEngine(CachedEngine):
    """The cached engine with a timer around each network forward, and the batch it ran on."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.forwards: list[tuple[int, float]] = []

    def _forward(self, network):
        inner = CachedEngine._forward(network)

        def timed(**kwargs):
            start = time.perf_counter()
            out = inner(**kwargs)
            self.forwards.append((kwargs["input_ids"].shape[0], time.perf_counter() - start))
            return out

        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=SMOLLM2_ALIAS)
    parser.add_argument("--output", type=Path, default=RESULTS / "floor-cpu.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(args.model), load_tokenizer(args.model)
    model.eval()
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    hidden, inner = model.config.hidden_size, model.config.intermediate_size
    layer_params = sum(p.numel() for p in decoder.layers.parameters())
    head_params = head.weight.numel()
    weight_bytes = (layer_params + head_params) * 4
    linear_bytes = sum(
        m.weight.numel() * m.weight.element_size()
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    )

    rates = {
        "gemm_decode_flops_per_s": gemm_flops_per_s(PROMPTS * SAMPLES, hidden, inner),
        "gemm_update_flops_per_s": gemm_flops_per_s(MICRO_BATCH * 100, hidden, inner),
        "copy_bytes_per_s": copy_bytes_per_s(),
    }

    task = ArithmeticTask(num_ops=1, max_operand=20, operations="+-", num_train=64, num_test=8)
    prompts = [render_prompt(tokenizer, r) for r in task.records("train")[:PROMPTS]]
    engine = TimedEngine(model, tokenizer.pad_token_id, generation_eos_ids(model))
    params = SamplingParams(
        num_samples=SAMPLES, temperature=0.8, top_p=1.0, max_new_tokens=MAX_NEW_TOKENS, seed=0
    )
    linears = LinearTimer(model)
    rollouts = []
    for _ in range(3):  # the first is a warm-up
        engine.forwards, linears.seconds = [], 0.0
        start = time.perf_counter()
        completions = engine.generate(prompts, params)
        rollouts.append(
            {
                "seconds": time.perf_counter() - start,
                "forwards": list(engine.forwards),
                "in_linears_s": linears.seconds,
            }
        )
    timed = rollouts[1:]

    def forward_floor(rows: int, prefill_tokens: int = 0) -> float:
        flops = 2 * (layer_params * max(rows, prefill_tokens) + head_params * rows)
        return max(
            weight_bytes / rates["copy_bytes_per_s"], flops / rates["gemm_decode_flops_per_s"]
        )

    prefill_tokens = sum(len(p) for p in prompts)
    rollout_seconds = statistics.median(r["seconds"] for r in timed)
    in_forwards = statistics.median(sum(s for _, s in r["forwards"]) for r in timed)
    floors = [
        sum(
            forward_floor(rows, prefill_tokens if i == 0 else 0)
            for i, (rows, _) in enumerate(r["forwards"])
        )
        for r in timed
    ]
    decode = [s for r in timed for rows, s in r["forwards"][1:] if rows == PROMPTS * SAMPLES]
    in_linears = statistics.median(r["in_linears_s"] for r in timed)
    forwards = len(timed[0]["forwards"])
    rollout = {
        "seconds": rollout_seconds,
        "in_forwards_s": in_forwards,
        "in_linears_s": in_linears,
        # every forward reads every linear weight once (the head's too): the rate they stream at
        "linear_weight_bytes_per_s": forwards * linear_bytes / in_linears,
        "engine_overhead_s": rollout_seconds - in_forwards,
        "forwards": forwards,
        "completion_tokens": sum(len(c) for c in completions),
        "floor_s": statistics.median(floors),
        "decode_forward_at_16_rows_ms": 1e3 * statistics.median(decode) if decode else None,
        "decode_floor_at_16_rows_ms": 1e3 * forward_floor(PROMPTS * SAMPLES),
    }

    sequences = [
        p + c
        for p, c in zip([p for p in prompts for _ in range(SAMPLES)], completions, strict=True)
    ]
    batches = [sequences[i : i + MICRO_BATCH] for i in range(0, len(sequences), MICRO_BATCH)]
    padded = [
        torch.tensor([s + [tokenizer.pad_token_id] * (max(map(len, b)) - len(s)) for s in b])
        for b in batches
    ]

    def student_forward() -> None:
        with torch.no_grad():
            for ids in padded:
                decoder(input_ids=ids)

    update_tokens = sum(ids.numel() for ids in padded)
    update = {
        "forward_s": median_seconds(student_forward, repeats=3),
        "padded_tokens": update_tokens,
        "real_tokens": sum(map(len, sequences)),
        "forward_floor_s": 2 * layer_params * update_tokens / rates["gemm_update_flops_per_s"],
    }

    report = {
        "setup": {
            "model": args.model,
            "prompts": PROMPTS,
            "samples": SAMPLES,
            "max_new_tokens": MAX_NEW_TOKENS,
            "micro_batch_size": MICRO_BATCH,
            "dtype": "float32",
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "layer_parameters": layer_params,
            "head_parameters": head_params,
            "floor": "a forward: max(weight bytes / copy traffic rate, 2 x parameters x rows / "
            "GEMM rate); the prefill counts its prompt tokens as rows",
        },
        "rates": rates,
        "rollout": rollout,
        "update": update,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(report))
    print(f"wrote {args.output}")


def markdown_table(report: dict) -> str:
    rates, rollout, update = report["rates"], report["rollout"], report["update"]
    return "\n".join(
        [
            f"GEMM float32: {rates['gemm_decode_flops_per_s'] / 1e9:.0f} GFLOP/s at 16 rows, "
            f"{rates['gemm_update_flops_per_s'] / 1e9:.0f} at 800; copy "
            f"{rates['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write); the rollout's matmuls "
            f"read their weights at {rollout['linear_weight_bytes_per_s'] / 1e9:.1f} GB/s",
            "",
            "| piece | measured s | floor s | measured / floor |",
            "|---|---|---|---|",
            f"| rollout, whole engine | {rollout['seconds']:.2f} | {rollout['floor_s']:.2f} "
            f"| {rollout['seconds'] / rollout['floor_s']:.1f} |",
            f"| rollout, inside the forwards | {rollout['in_forwards_s']:.2f} "
            f"| {rollout['floor_s']:.2f} | {rollout['in_forwards_s'] / rollout['floor_s']:.1f} |",
            f"| rollout, inside the matmuls (nn.Linear) | {rollout['in_linears_s']:.2f} "
            f"| {rollout['floor_s']:.2f} | {rollout['in_linears_s'] / rollout['floor_s']:.1f} |",
            f"| one decode forward at 16 rows (ms) | {rollout['decode_forward_at_16_rows_ms']:.1f} "
            f"| {rollout['decode_floor_at_16_rows_ms']:.1f} "
            f"| {rollout['decode_forward_at_16_rows_ms'] / rollout['decode_floor_at_16_rows_ms']:.1f} |",
            f"| update: decoder forward, {update['padded_tokens']} tokens | "
            f"{update['forward_s']:.2f} | {update['forward_floor_s']:.2f} "
            f"| {update['forward_s'] / update['forward_floor_s']:.1f} |",
        ]
    )


if __name__ == "__main__":
    main()
