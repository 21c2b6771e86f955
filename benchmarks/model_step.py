"""One self-distillation training step of a randomly initialised model of a real shape, phase by
phase: Qwen3-0.6B's configuration built locally (no hub, no weights), N = batch x sequence tokens,
the teacher the same model on a context with some tokens changed (as feedback changes it in VPD).

Phases, each timed (device synchronised) and its peak memory above the memory at its start:
teacher forward (no gradient), student forward (to the last hidden states), the loss (for the
fused losses this forward already produces grad_hidden and grad_weight), the backward through the
backbone, the optimizer step. Variants: the fused loss with its default gradient tile
(`vpd_kernels`), with a float32 tile (`vpd_kernels/bwd=float32`), and eager PyTorch (full logits,
log-softmax, KL). Results are written after every variant, so a run cut short keeps what it did.

    python benchmarks/model_step.py --out /tmp/step.json               # GPU: Qwen3-0.6B, 8 x 2048
    python benchmarks/model_step.py --tiny --device cpu --out /tmp/s.json  # the dry run's shapes
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Qwen3Config, Qwen3ForCausalLM

import vpd_kernels as vk

# Qwen/Qwen3-0.6B's config.json, the fields that set the shapes and the cost.
QWEN3_0_6B = dict(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
)
TINY = dict(QWEN3_0_6B, vocab_size=512, hidden_size=64, intermediate_size=128)
TINY.update(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
VARIANTS = ("vpd_kernels", "vpd_kernels/bwd=float32", "eager")


def eager_loss(hidden, weight, teacher_hidden):
    """Reverse KL from full logits, as written by hand (bf16 logits, float32 log-softmax)."""
    log_s = F.log_softmax((hidden @ weight.T).float(), dim=-1)
    with torch.no_grad():
        log_t = F.log_softmax((teacher_hidden @ weight.T).float(), dim=-1)
    return F.kl_div(log_t, log_s, log_target=True, reduction="batchmean")


def loss_fn(variant: str):
    if variant == "eager":
        return eager_loss
    tile = torch.float32 if variant.endswith("float32") else None
    return lambda h, w, th: vk.fused_linear_distill_loss(h, w, th, backward_dtype=tile)


class Phases:
    """Wall time (device synchronised) and peak memory above the start of each named phase."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: dict[str, float] = {}
        self.peaks: dict[str, float] = {}

    def run(self, name: str, fn):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
            self.peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
        self.times[name] = (time.perf_counter() - start) * 1e3
        return out


def one_step(model, optimizer, ids, teacher_ids, loss, phases: Phases) -> float:
    backbone, head = model.model, model.lm_head.weight

    def teacher():
        with torch.no_grad():
            return backbone(input_ids=teacher_ids).last_hidden_state

    teacher_hidden = phases.run("teacher forward", teacher)
    hidden = phases.run("student forward", lambda: backbone(input_ids=ids).last_hidden_state)
    flat, teacher_flat = hidden.flatten(0, 1), teacher_hidden.flatten(0, 1)
    value = phases.run("loss", lambda: loss(flat, head, teacher_flat))
    phases.run("backward", value.backward)

    def update():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    phases.run("optimizer", update)
    return float(value.detach())


def run_variant(variant: str, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    config = Qwen3Config(**(TINY if args.tiny else QWEN3_0_6B))
    dtype = getattr(torch, args.dtype)
    model = Qwen3ForCausalLM(config).to(device=device, dtype=dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=g)
    teacher_ids = ids.clone()
    changed = torch.rand(ids.shape, generator=g) < 0.05  # the feedback's edits
    teacher_ids[changed] = torch.randint(0, config.vocab_size, (int(changed.sum()),), generator=g)
    ids, teacher_ids = ids.to(device), teacher_ids.to(device)
    loss = loss_fn(variant)
    steps = []
    try:
        for _ in range(args.warmup + args.steps):
            phases = Phases(device)
            value = one_step(model, optimizer, ids, teacher_ids, loss, phases)
            steps.append((phases, value))
    except torch.OutOfMemoryError:
        return {"variant": variant, "status": "out of memory"}
    timed = [p for p, _ in steps[args.warmup :]]
    names = list(timed[0].times)
    return {
        "variant": variant,
        "status": "ok",
        "loss": steps[-1][1],
        "phase_ms": {n: statistics.median(p.times[n] for p in timed) for n in names},
        "step_ms": statistics.median(sum(p.times.values()) for p in timed),
        "phase_peak_mb": {n: max(p.peaks.get(n, 0.0) for p in timed) for n in names}
        if device.type == "cuda"
        else None,
        "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model, vocabulary 512")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", required=True, help="JSON path, rewritten after every variant")
    args = parser.parse_args()
    device = torch.device(args.device)
    shape = TINY if args.tiny else QWEN3_0_6B
    payload = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": "tiny Qwen3" if args.tiny else "Qwen3-0.6B shape, random weights",
        "config": {**shape, "batch": args.batch, "seq": args.seq, "dtype": args.dtype},
        "loss": "reverse KL of the student's next-token distribution to the teacher's",
        "results": [],
    }
    for variant in args.variants.split(","):
        row = run_variant(variant, args, device)
        payload["results"].append(row)
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
        print(json.dumps(row), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
