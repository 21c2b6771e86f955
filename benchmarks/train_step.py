"""Tokens/s and peak memory of one VPD step (rollout, M-step, E-step timed separately), with the
fused `vpd_kernels` losses against the same step with eager PyTorch losses.

The eager variant replaces `vk.fused_linear_distill_loss` and `vk.fused_linear_token_logprobs`,
as the trainer sees them, with the textbook version: full [tokens, vocab] logits = hidden @ W.T,
log-softmax, divergence. Everything else (model, LoRA, rollouts, micro-batches) is identical.

Each (model, variant) runs in its own subprocess, so allocator state does not carry over.
Peak memory on the CPU: a thread samples the process RSS (/proc/self/statm) every 2 ms; a phase's
peak is the highest sample during the phase minus the RSS at its start, after `malloc_trim(0)`
has handed freed heap back to the OS (otherwise freed-but-cached memory hides the phase's growth).
On a GPU it is `torch.cuda.max_memory_allocated` above the allocation at the phase's start.

    .venv/bin/python benchmarks/train_step.py                       # tiny + SmolLM2 on the CPU
    .venv/bin/python benchmarks/train_step.py --models builtin:tiny-random --output /tmp/ts.json

`--compare` (issue 22) times instead this project's vpd / grpo / sdpo steps with each rollout
engine (`model.rollout.engine`), split into pieces of work (generate, verify, forwards, losses,
backward; the rest is Python and the optimizer), against one step of TRL's `GRPOTrainer` and
`trl.experimental.sdpo.SDPOTrainer` on the same model, prompts, G, completion length and LoRA:

    .venv/bin/python benchmarks/train_step.py --compare vpd:generate vpd:cached trl-grpo trl-sdpo

The `vllm` rows (`vpd:vllm`, `grpo:vllm-bf16`, ...) sample with vLLM in the process (`-bf16`: a
bfloat16 engine beside the float32 trainer); their generate time includes the weight push.

`--precisions 32-true bf16-true` runs each of this project's rows at each Lightning precision, in
the same run (to results/train-step-precision-cpu.json); TRL's rows stay float32.

Realistic GPU shapes (vocabulary 151936, sequence 2048) need a GPU; for the losses alone at those
shapes see benchmarks/bench_kernels.py.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch

import vpd_kernels as vk
import vpd_kernels.fused_linear as fused_linear
from vpd_kernels import DistillStats
from vpd_kernels.torch_rows import divergence_rows, kl
from vpd_lightning.options import EStepOptions, LoraOptions, RolloutOptions
from vpd_lightning.tasks import ArithmeticTask
from vpd_lightning.trainer.data import VPDDataModule
from vpd_lightning.trainer.module import VPDModule

RESULTS = Path(__file__).parent / "results"
PHASES = ("rollout", "mstep", "estep")


# ---------------------------------------------------------------------------- eager losses
def eager_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor | None = None,
    *,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    ref_coef: float = 0.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, DistillStats]:
    """`vk.fused_linear_distill_loss` written the usual way: whole logits, autograd keeps them."""
    teacher_weight = student_weight if teacher_weight is None else teacher_weight
    ref_weight = student_weight if ref_weight is None else ref_weight
    logits = (student_hidden @ student_weight.T).float()
    log_s = torch.log_softmax(logits / temperature, dim=-1)
    with torch.no_grad():
        teacher_logits = (teacher_hidden @ teacher_weight.T).float()
        log_t = torch.log_softmax(teacher_logits / temperature, dim=-1)
    div = divergence_rows(log_s, log_t, divergence, beta)
    ref_kl = None
    per_token = div
    if ref_hidden is not None:
        log_p = torch.log_softmax(logits, dim=-1)
        with torch.no_grad():
            log_r = torch.log_softmax((ref_hidden @ ref_weight.T).float(), dim=-1)
        ref_kl = kl(log_p.exp(), log_p, log_r)
        per_token = div + ref_coef * ref_kl
    weights = torch.ones_like(div) if mask is None else mask.to(div.dtype)
    weighted = per_token * weights
    if reduction == "none":
        loss = weighted
    elif reduction == "sum":
        loss = weighted.sum()
    else:
        loss = weighted.sum() / weights.sum().clamp_min(1.0)
    if not return_stats:
        return loss
    with torch.no_grad():
        probs = log_s.exp()
        entropy = -(probs * torch.where(probs > 0, log_s, 0.0)).sum(-1)
    detached_ref = ref_kl.detach() if ref_kl is not None else None
    return loss, DistillStats(div.detach(), detached_ref, entropy)


def eager_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """`vk.fused_linear_token_logprobs` written the usual way, with whole logits."""
    log_p = torch.log_softmax((hidden @ weight.T).float() / temperature, dim=-1)
    return log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def use_eager_losses() -> None:
    """Swap the two fused entry points, as the trainer module sees them, for the eager ones."""
    vk.fused_linear_distill_loss = eager_distill_loss
    vk.fused_linear_token_logprobs = eager_token_logprobs


def use_small_chunks(logits_per_chunk: int) -> None:
    """Fused losses with smaller chunks. The default chunk (vk's CHUNK_LOGITS, 2**27 logits) holds
    about 2700 rows at SmolLM2's vocabulary, more than a CPU micro-batch has tokens, so there the
    default fused path still builds one whole [tokens, vocab] chunk; this variant shows the bound."""
    fused_linear.CHUNK_LOGITS = logits_per_chunk


VARIANTS = ("fused", "eager", "fused-small-chunk")


# ---------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory above the start of a `with` block: sampled RSS on the CPU, the CUDA
    allocator's high-water mark on a GPU."""

    def __init__(self, device: torch.device, interval_s: float = 0.002) -> None:
        self.device, self.interval_s = device, interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._libc = ctypes.CDLL("libc.so.6") if device.type == "cpu" else None
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _sample(self, start: int) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._rss() - start)
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        self._libc.malloc_trim(0)
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, args=(self._rss(),), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._start
            return
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------- one timed step
class TimedStepModule(VPDModule):
    """A VPD step whose three phases are timed and measured one by one. The E-step runs every
    step, on that step's own rollouts, so that each step has all three phases."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.measurements: list[dict] = []

    def training_step(self, batch: list[dict], batch_idx: int) -> None:
        row: dict = {}
        rollouts = self._phase(row, "rollout", lambda: self.collect_rollouts(batch))
        completion = sum(len(r.completion_ids) for r in rollouts)
        row["completion_tokens"] = completion
        row["student_tokens"] = completion + sum(len(r.prompt_ids) for r in rollouts)
        row["teacher_tokens"] = completion + sum(len(r.teacher_prompt_ids) for r in rollouts)
        self._phase(row, "mstep", lambda: self.update_student(rollouts))
        batches = self.batches_of(rollouts)
        self._phase(row, "estep", lambda: self.estep.update(self.policy, batches, self.stepper))
        self.measurements.append(row)

    def _phase(self, row: dict, name: str, fn: Callable):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        with PeakMemory(self.device) as memory:
            start = time.perf_counter()
            out = fn()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            row[f"{name}_s"] = time.perf_counter() - start
        row[f"{name}_peak_mib"] = memory.peak_bytes / 2**20
        return out


def run_steps(
    module, task, steps: int, accelerator: str, prompts_per_step: int, precision: str = "32-true"
) -> None:
    """Train `module` for `steps` steps with nothing else (no logger, checkpoint or validation)."""
    with tempfile.TemporaryDirectory() as root:
        pl.Trainer(
            accelerator=accelerator,
            devices=1,
            precision=precision,
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            default_root_dir=root,
        ).fit(module, datamodule=VPDDataModule(task, prompts_per_step=prompts_per_step, val_size=1))


def measure(
    model: str, variant: str, steps: int, warmup: int, accelerator: str, small_chunk: int
) -> dict:
    """Run `warmup + steps` timed steps of one (model, variant) and summarize the last `steps`."""
    if variant == "eager":
        use_eager_losses()
    if variant == "fused-small-chunk":
        use_small_chunks(small_chunk)
    pl.seed_everything(0, verbose=False)
    task = ArithmeticTask(
        num_ops=1, max_operand=20, operations="+-", answer_format="last_number", seed=0
    )
    module = TimedStepModule(
        model=model,
        method="vpd",
        lora=LoraOptions(r=16, alpha=32),
        max_context_tokens=96,
        rollout=RolloutOptions(num_generations=4, temperature=0.8, max_new_tokens=48),
        estep=EStepOptions(every=1),
        micro_batch_size=8,
        task=task,
    )
    run_steps(module, task, warmup + steps, accelerator, prompts_per_step=4)
    rows = module.measurements[warmup:]
    vocab = module.policy.head_weight.shape[0]
    summary = {
        "model": model,
        "variant": variant,
        "steps": rows,
        "device": str(module.device),
        "vocab": vocab,
        "rows_per_chunk": (None if variant == "eager" else fused_linear.CHUNK_LOGITS // vocab),
    }
    tokens = statistics.fmean(r["completion_tokens"] for r in rows)
    for phase in PHASES:
        seconds = statistics.fmean(r[f"{phase}_s"] for r in rows)
        summary[f"{phase}_s"] = seconds
        summary[f"{phase}_tokens_per_s"] = tokens / seconds
        summary[f"{phase}_peak_mib"] = max(r[f"{phase}_peak_mib"] for r in rows)
    summary["completion_tokens"] = tokens
    return summary


# ---------------------------------------------------------------------------- issue 22: vs TRL
PROMPTS, GENERATIONS, TEMPERATURE = 4, 4, 0.8


def arithmetic_task() -> ArithmeticTask:
    return ArithmeticTask(
        num_ops=1, max_operand=20, operations="+-", answer_format="last_number", seed=0
    )


def medians(rows: list[dict], keys) -> dict:
    return {k: statistics.median(r[k] for r in rows) for k in keys}


class PhaseClock:
    """Exclusive wall time per label: a wrapped call's time, minus its wrapped callees', goes
    to its label (prefixed by the step phase); a `transparent` wrap inside another charges its
    time to the enclosing label (the teacher's forward calls the student's `hidden`)."""

    def __init__(self) -> None:
        self.phase = ""
        self.totals: dict[str, float] = {}
        self._stack: list[list] = []  # [label, start, time spent in children]

    def wrap(self, owner, name: str, label: str, transparent: bool = False) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            if transparent and self._stack:
                return inner(*args, **kwargs)
            frame = [f"{self.phase}/{label}", time.perf_counter(), 0.0]
            self._stack.append(frame)
            try:
                return inner(*args, **kwargs)
            finally:
                self._stack.pop()
                spent = time.perf_counter() - frame[1]
                self.totals[frame[0]] = self.totals.get(frame[0], 0.0) + spent - frame[2]
                if self._stack:
                    self._stack[-1][2] += spent

        setattr(owner, name, timed)

    def take(self) -> dict[str, float]:
        out, self.totals = self.totals, {}
        return out


class ComparedStepModule(VPDModule):
    """This project's step, timed per phase and per piece of work (`PhaseClock`). The VPD E-step
    runs every step on that step's rollouts; its time is amortised over `amortise_estep` steps
    (the interval at which it runs in `make demo`), as over as many steps' rollouts it costs that
    many times more."""

    def __init__(self, amortise_estep: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.amortise_estep = amortise_estep
        self.measurements: list[dict] = []
        self.clock = PhaseClock()
        import vpd_lightning.rollout.sampling as sampling

        self.clock.wrap(self.engine, "generate", "generate")
        self.clock.wrap(sampling, "verify_many", "verify")
        self.clock.wrap(self.policy, "hidden", "forward (student/teacher hidden)", True)
        self.clock.wrap(self.policy, "teacher_features", "teacher forward")
        self.clock.wrap(self.policy, "prior_features", "prior forward")
        self.clock.wrap(vk, "fused_linear_distill_loss", "head + divergence")
        self.clock.wrap(vk, "fused_linear_token_logprobs", "head + log-probs")
        self.clock.wrap(self, "manual_backward", "backward")

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if hasattr(self, "builder"):
            self.clock.wrap(self.builder, "build_batch", "teacher contexts")

    def training_step(self, batch: list[dict], batch_idx: int) -> None:
        row: dict = {}
        start = time.perf_counter()
        self.clock.phase = "rollout"
        rollouts = self.collect_rollouts(batch)
        row["rollout_s"] = time.perf_counter() - start
        row["completion_tokens"] = sum(len(r.completion_ids) for r in rollouts)
        self.clock.phase = "mstep"
        start = time.perf_counter()
        self.update_student(rollouts)
        row["mstep_s"] = time.perf_counter() - start
        row["estep_s"] = 0.0
        if self.estep is not None:
            self.clock.phase = "estep"
            start = time.perf_counter()
            self.estep.update(self.policy, self.batches_of(rollouts), self.stepper)
            row["estep_s"] = time.perf_counter() - start
        row["update_s"] = row["mstep_s"] + row["estep_s"] / self.amortise_estep
        row["step_s"] = row["rollout_s"] + row["update_s"]
        row["pieces_s"] = self.clock.take()
        self.measurements.append(row)


def measure_project(
    method: str,
    engine: str,
    model: str,
    steps: int,
    warmup: int,
    max_new_tokens: int,
    precision: str,
) -> dict:
    pl.seed_everything(0, verbose=False)
    task = arithmetic_task()
    module = ComparedStepModule(
        amortise_estep=3,
        model=model,
        method=method,
        lora=LoraOptions(r=16, alpha=32),
        max_context_tokens=96,
        rollout=RolloutOptions(
            num_generations=GENERATIONS,
            temperature=TEMPERATURE,
            max_new_tokens=max_new_tokens,
            engine=engine.removesuffix("-bf16"),
            sampler_dtype="bfloat16" if engine.endswith("-bf16") else None,
        ),
        estep=EStepOptions(every=1),
        micro_batch_size=8,
        task=task,
    )
    run_steps(module, task, warmup + steps, "auto", PROMPTS, precision)
    rows = module.measurements[warmup:]
    keys = ("rollout_s", "mstep_s", "estep_s", "update_s", "step_s", "completion_tokens")
    name = f"{method} ({engine})" if precision == "32-true" else f"{method} ({engine}, {precision})"
    out = {"name": name, "method": method, "engine": engine, "precision": precision, "steps": rows}
    out.update(medians(rows, keys))
    pieces = sorted({k for r in rows for k in r["pieces_s"]})
    out["pieces_s"] = {
        k: statistics.median(r["pieces_s"].get(k, 0.0) for r in rows) for k in pieces
    }
    return out


# ---------------------------------------------------------------------------- TRL's trainers
def measure_trl(
    trainer_name: str, model: str, steps: int, warmup: int, max_new_tokens: int
) -> dict:
    """One TRL `GRPOTrainer` or `SDPOTrainer` run at the project's settings (same model, prompts,
    G, completion length, LoRA, float32); rollout time is TRL's own `_generate`, timed by a wrap."""
    from datasets import Dataset
    from peft import LoraConfig

    from vpd_lightning.policy.models import load_causal_lm, load_tokenizer
    from vpd_lightning.rollout.prompts import student_messages

    pl.seed_everything(0, verbose=False)
    task = arithmetic_task()
    records = task.records("train")
    tokenizer = load_tokenizer(model)
    network = load_causal_lm(model, torch.float32)
    network.hf_quantizer = None  # the GGUF loader marks the model quantized; it is dequantized
    network.is_quantized = False
    by_prompt = {student_messages(r)[-1]["content"]: r for r in records}

    def reward(prompts, completions, **_) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        prompt_texts = [p[-1]["content"] if isinstance(p, list) else p for p in prompts]
        return [
            float(task.verify(by_prompt[p], t).reward)
            for p, t in zip(prompt_texts, texts, strict=True)
        ]

    dataset = Dataset.from_list([{"prompt": student_messages(r)} for r in records])
    common = dict(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=PROMPTS * GENERATIONS,
        num_generations=GENERATIONS,
        max_completion_length=max_new_tokens,
        temperature=TEMPERATURE,
        learning_rate=5e-5,
        max_steps=warmup + steps,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
    )
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    if trainer_name == "trl-grpo":
        from trl import GRPOConfig, GRPOTrainer

        args, cls = GRPOConfig(**common), GRPOTrainer
    else:
        from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

        args, cls = SDPOConfig(**common), SDPOTrainer
    trainer = cls(
        model=network,
        reward_funcs=reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
    )
    rows: list[dict] = []
    generate = trainer._generate

    def timed_generate(*a, **k):
        start = time.perf_counter()
        out = generate(*a, **k)
        rows[-1]["rollout_s"] += time.perf_counter() - start
        return out

    trainer._generate = timed_generate
    step = trainer.training_step

    def timed_step(*a, **k):
        rows.append({"rollout_s": 0.0})
        start = time.perf_counter()
        out = step(*a, **k)
        rows[-1]["step_s"] = time.perf_counter() - start
        rows[-1]["update_s"] = rows[-1]["step_s"] - rows[-1]["rollout_s"]
        return out

    trainer.training_step = timed_step
    trainer.train()
    kept = rows[warmup:]
    return {
        "name": trainer_name,
        "steps": kept,
        **medians(kept, ("rollout_s", "update_s", "step_s")),
    }


# ---------------------------------------------------------------------------- driver
COMPARED = (
    "vpd:generate",
    "vpd:cached",
    "grpo:generate",
    "grpo:cached",
    "sdpo:generate",
    "sdpo:cached",
    "vpd:vllm",
    "vpd:vllm-bf16",
    "grpo:vllm",
    "grpo:vllm-bf16",
    "sdpo:vllm",
    "sdpo:vllm-bf16",
    "trl-grpo",
    "trl-sdpo",
)


def compare_worker(
    name: str, model: str, steps: int, warmup: int, max_new_tokens: int, precision: str
) -> dict:
    if name.startswith("trl-"):
        return measure_trl(name, model, steps, warmup, max_new_tokens)
    method, engine = name.split(":")
    return measure_project(method, engine, model, steps, warmup, max_new_tokens, precision)


def compare(args: argparse.Namespace) -> None:
    """Issue 22's table: each configuration in its own interpreter, one after the other."""
    results = []
    runs = [
        (n, "32-true") if n.startswith("trl-") else (n, p)
        for n in args.compare
        for p in args.precisions
    ]
    for name, precision in dict.fromkeys(runs):
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            command = [sys.executable, __file__, "--compare-worker", name, "--output", out.name]
            command += ["--models", args.models[-1], "--steps", str(args.steps)]
            command += ["--warmup", str(args.warmup), "--max-new-tokens", str(args.max_new_tokens)]
            subprocess.run([*command, "--precisions", precision], check=True)
            results.append(json.loads(Path(out.name).read_text()))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "steps"}), flush=True)
    load = os.getloadavg()
    report = {
        "setup": {
            "model": args.models[-1],
            "lora": "r=16, alpha=32, all-linear",
            "prompts_per_step": PROMPTS,
            "num_generations": GENERATIONS,
            "max_new_tokens": args.max_new_tokens,
            "temperature": TEMPERATURE,
            "dtype": "float32" if args.precisions == ["32-true"] else "per row",
            "timed_steps": args.steps,
            "warmup_steps": args.warmup,
            "torch_threads": torch.get_num_threads(),
            "load_average_at_end": load,
            "vpd_update_s": "M-step + E-step / 3 (the E-step runs every step here, on that step's "
            "rollouts; make demo runs it every 3 steps on 3 steps' rollouts)",
        },
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print("| run | rollout s | update s | step s |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['rollout_s']:.1f} | {r['update_s']:.1f} | {r['step_s']:.1f} |")
    print(f"wrote {args.output}")


def run_in_subprocess(args: argparse.Namespace, model: str, variant: str) -> dict:
    """One (model, variant) in a fresh interpreter: clean allocator, clean peak."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [
            sys.executable,
            __file__,
            "--worker",
            variant,
            "--models",
            model,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--device",
            args.device,
            "--small-chunk-logits",
            str(args.small_chunk_logits),
            "--output",
            out.name,
        ]
        subprocess.run(command, check=True)
        return json.loads(Path(out.name).read_text())


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| model | losses | rows/chunk | rollout tok/s | M-step tok/s | E-step tok/s | rollout peak MiB "
        "| M-step peak MiB | E-step peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['rows_per_chunk'] or '-'} "
            f"| {r['rollout_tokens_per_s']:.0f} "
            f"| {r['mstep_tokens_per_s']:.0f} | {r['estep_tokens_per_s']:.0f} "
            f"| {r['rollout_peak_mib']:.0f} | {r['mstep_peak_mib']:.0f} | {r['estep_peak_mib']:.0f} |"
        )
    return "\n".join(lines)


def notes(results: list[dict]) -> list[str]:
    """What this run does not show."""
    out = [
        "The rollout phase does not use the losses: its fused/eager difference is noise.",
        "fused with the default chunk materializes a whole micro-batch's logits whenever the "
        "micro-batch has fewer tokens than rows_per_chunk; then its memory matches "
        "eager; fused-small-chunk shows the bounded-memory path at the same step.",
    ]
    if all(r["device"] == "cpu" for r in results):
        out.append(
            "CPU only (no GPU in this run): the realistic-shape GPU case (vocab 151936, "
            "sequence 2048) was not measured."
        )
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["builtin:tiny-random", "builtin:smollm2-135m-instruct"]
    )
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument(
        "--small-chunk-logits", type=int, default=1 << 22, help="chunk of fused-small-chunk"
    )
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--device", default="auto", help="Lightning accelerator: auto, cpu, gpu")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument(
        "--compare",
        nargs="+",
        choices=COMPARED,
        help="issue 22: this project's steps by engine against TRL's trainers, on the last of "
        "--models (SmolLM2 by default), to --output (default: "
        "benchmarks/results/train-step-vs-trl-cpu.json)",
    )
    parser.add_argument(
        "--precisions",
        nargs="+",
        choices=("32-true", "bf16-true", "bf16-mixed"),
        default=["32-true"],
        help="--compare: Lightning precisions to run each of this project's rows at (TRL's rows "
        "stay float32, the setting their comparison was matched at)",
    )
    parser.add_argument("--compare-worker", choices=COMPARED, help=argparse.SUPPRESS)
    parser.add_argument(
        "--max-new-tokens", type=int, default=48, help="--compare: the completion cap"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.compare_worker:
        result = compare_worker(
            args.compare_worker,
            args.models[0],
            args.steps,
            args.warmup,
            args.max_new_tokens,
            args.precisions[0],
        )
        args.output.write_text(json.dumps(result))
        return
    if args.compare:
        default = "train-step-vs-trl-cpu.json"
        if args.precisions != ["32-true"]:
            default = "train-step-precision-cpu.json"
        args.output = args.output or RESULTS / default
        compare(args)
        return
    args.output = args.output or RESULTS / "train-step-cpu.json"
    if args.worker:
        result = measure(
            args.models[0],
            args.worker,
            args.steps,
            args.warmup,
            args.device,
            args.small_chunk_logits,
        )
        args.output.write_text(json.dumps(result))
        return
    results = [
        run_in_subprocess(args, model, variant)
        for model in args.models
        for variant in args.variants
    ]
    report = {
        "setup": {
            "method": "vpd",
            "lora_r": 16,
            "prompts_per_step": 4,
            "num_generations": 4,
            "max_new_tokens": 48,
            "micro_batch_size": 8,
            "estep": "every step, on that step's 16 rollouts",
            "timed_steps": args.steps,
            "warmup_steps": args.warmup,
            "torch_threads": torch.get_num_threads(),
        },
        "memory_method": (
            "CPU: per phase, max sampled RSS (/proc/self/statm every 2 ms) minus RSS at the phase "
            "start, after malloc_trim(0); each (model, variant) in its own subprocess. GPU: "
            "torch.cuda.max_memory_allocated above the allocation at the phase start."
        ),
        "tokens_per_s": "completion tokens of the step / the phase's seconds",
        "notes": notes(results),
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(results))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
