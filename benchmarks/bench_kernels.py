"""Benchmark vpd_kernels against eager PyTorch, torch.compile, Liger-Kernel and TRL: time and
memory of one step, and the precision of bf16 self-distillation.

Workload: reverse KL + trust-region KL to a reference (ref_coef=0.1), forward + backward.
- logits-in: student/teacher/ref logits (N, V) -> loss, grad wrt student logits.
- fused-linear: hidden (N, H) and an LM head (V, H) per model -> loss, grads wrt student hidden
  and weight (teacher and reference share the student's head).
- topk: student logits (N, V) and the teacher's top-k ids and log-probs (N, k) (k = --k, 100 as
  SDPO) -> reverse KL over the k tokens plus the tail bucket (no ref), grad wrt student logits.

Every method runs in its own subprocess so that peak memory is its own:
- CUDA: torch.cuda.max_memory_allocated() minus the memory held before the step (inputs), so
  gradients produced by the step count as extra.
- CPU: the process's resident-set high-water mark (getrusage ru_maxrss) minus its RSS after the
  inputs exist. Tensors this large are mmap'd by the allocator and returned on free, so RSS
  follows tensor allocations; the step is run once for this measurement before any timing.
Times are the median of --repeats steps after one warm-up (CUDA events on GPU); each row also
gives its time as a multiple of vpd_kernels' (x vpd). TRL's row is its ChunkedDivergenceFunction
(DistillationTrainer's loss: hidden states in, fused mode only); it and Liger's (JSD at beta = 1,
Liger's chunked torch loss on CPU, its fused-linear Triton kernel on CUDA) have no trust-region
term.

Precision (bf16, a teacher that is the student plus a relative perturbation of 1e-3, 1e-2, 1e-1,
reverse KL, no ref): each method's loss and grad_hidden against float64 computed from the same
bf16 inputs, beside the output floor (the exact gradient rounded once to bf16). It runs in a
child with TRITON_INTERPRET=1 on CPU, so that the Triton rows (vpd_kernels', Liger's fused-linear
JSD) run too, at a small shape. The results go into the same JSON ("precision").
Hardware floors (GPU only): logits-in = bytes read and written once (3 inputs + 1 gradient) /
measured device copy bandwidth; fused-linear = matmul FLOPs (3 forward + 2 backward GEMMs of
2*N*V*H) / measured bf16 GEMM rate.

    python benchmarks/bench_kernels.py            # CPU: N=2048, V=32768, H=512, each loss
    python benchmarks/bench_kernels.py --n 16384  # GPU defaults: N=16384, V=151936, H=2048
    python benchmarks/bench_kernels.py --quick --modes topk --out /tmp/k.json  # a smoke run

On a shared CPU, `--background-workers 3` times eager and vpd_kernels (--loaded-methods) a second
time beside 3 busy processes and records the slowdown and the load average, next to the quiet
rows (the load average at each row is in the JSON too):

    python benchmarks/bench_kernels.py --background-workers 3   # the committed CPU table
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REF_COEF = 0.1
METHODS = ("eager", "torch.compile", "liger", "trl", "vpd_kernels")
QUICK = {"n": 256, "v": 8192, "h": 256, "repeats": 2}  # --quick: a smoke run, not a measurement


# ---------------------------------------------------------------- the workloads
def eager_logits_loss(student, teacher, ref):
    """What one writes by hand: log_softmax + KL, in the input dtype."""
    log_s = F.log_softmax(student, dim=-1)
    rev = F.kl_div(F.log_softmax(teacher, dim=-1), log_s, log_target=True, reduction="batchmean")
    trust = F.kl_div(F.log_softmax(ref, dim=-1), log_s, log_target=True, reduction="batchmean")
    return rev + REF_COEF * trust


def eager_fused_loss(hidden, weight, teacher_hidden, ref_hidden):
    with torch.no_grad():
        teacher, ref = teacher_hidden @ weight.T, ref_hidden @ weight.T
    return eager_logits_loss(hidden @ weight.T, teacher, ref)


def eager_topk_loss(student, ids, teacher_logprobs):
    """Top-k + tail reverse KL as it is written by hand (SDPO-style), in float32."""
    log_s = F.log_softmax(student.float(), dim=-1).gather(-1, ids)

    def with_tail(log_k):
        rest = (1 - log_k.exp().sum(-1, keepdim=True)).clamp_min(1e-30)
        return torch.cat([log_k, rest.log()], dim=-1)

    log_p, log_q = with_tail(log_s), with_tail(teacher_logprobs)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def build_step(method: str, mode: str):
    """Return loss_fn(*inputs) for `method`, or raise RuntimeError(reason) if unavailable."""
    eager = {"logits": eager_logits_loss, "fused": eager_fused_loss, "topk": eager_topk_loss}[mode]
    if method == "eager":
        return eager
    if method == "torch.compile":
        return torch.compile(eager)
    if method == "trl":
        if mode != "fused":
            raise RuntimeError("TRL's chunked divergence takes hidden states (fused mode only)")
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        def trl_loss(h, w, th, rh):
            per_token, _ = ChunkedDivergenceFunction.apply(
                h, w, None, th, w, None, 1.0, 1.0, 1.0, None, 1.0, None
            )
            return per_token.mean()

        return trl_loss
    if method == "liger" and mode == "topk":
        raise RuntimeError("no top-k distillation loss in Liger")
    if method == "liger" and mode == "logits" and not torch.cuda.is_available():
        raise RuntimeError("Liger's logits-in JSD is a Triton kernel: it needs a CUDA device")
    if method == "liger" and not torch.cuda.is_available():
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        chunked = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0, compiled=False
        )
        labels = {}
        return lambda h, w, th, rh: chunked(
            h, w, th, w, labels.setdefault(0, torch.zeros(len(h), dtype=torch.long))
        )
    if method == "liger":
        try:
            from liger_kernel.transformers import LigerFusedLinearJSD, LigerJSD
        except ImportError as err:
            raise RuntimeError("not installed") from err
        # Liger has JSD (no reverse KL + trust term); beta=1 is its reverse-KL end point.
        if mode == "logits":
            jsd = LigerJSD(beta=1.0)
            return lambda s, t, r: jsd(F.log_softmax(t.float(), -1), F.log_softmax(s.float(), -1))
        fused = LigerFusedLinearJSD(jsd_beta=1.0)
        return lambda h, w, th, rh: fused(h, w, th, w)
    import vpd_kernels as vk

    backend = "auto"
    if method.startswith("vpd_kernels/bwd="):  # the fused-linear gradient tile's dtype, forced
        if mode != "fused":
            raise RuntimeError("backward_dtype is a fused-linear keyword (fused mode only)")
        tile = getattr(torch, method.split("=", 1)[1])
        return lambda h, w, th, rh: vk.fused_linear_distill_loss(
            h, w, th, ref_hidden=rh, ref_coef=REF_COEF, backend=backend, backward_dtype=tile
        )
    if mode == "topk":
        return lambda s, ids, lp: vk.topk_distill_loss(s, ids, lp, backend=backend)
    if mode == "logits":
        return lambda s, t, r: vk.distill_loss(
            s, t, ref_logits=r, ref_coef=REF_COEF, backend=backend
        )
    return lambda h, w, th, rh: vk.fused_linear_distill_loss(
        h, w, th, ref_hidden=rh, ref_coef=REF_COEF, backend=backend
    )


def make_inputs(mode: str, n: int, v: int, h: int, k: int, dtype: torch.dtype, device: str):
    """Random inputs filled in place (no temporaries that would inflate the memory baseline)."""

    def rand(*shape, scale=1.0, grad=False):
        x = torch.empty(*shape, dtype=dtype, device=device).normal_(0.0, scale)
        return x.requires_grad_(grad)

    if mode == "topk":
        logprobs, ids = torch.log_softmax(rand(n, v, scale=2.0).float(), dim=-1).topk(k, dim=-1)
        return rand(n, v, scale=2.0, grad=True), ids, logprobs
    if mode == "logits":
        return rand(n, v, scale=2.0, grad=True), rand(n, v, scale=2.0), rand(n, v, scale=2.0)
    return rand(n, h, grad=True), rand(v, h, scale=h**-0.5, grad=True), rand(n, h), rand(n, h)


# ---------------------------------------------------------------- one method, in a child process
def current_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return kb * 1024


def run_child(args) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    try:
        step_fn = build_step(args.child, args.mode)
    except RuntimeError as err:
        return {"status": f"unavailable: {err}"}
    inputs = make_inputs(args.mode, args.n, args.v, args.h, args.k, dtype, device)
    leaves = [x for x in inputs if x.requires_grad]

    def step():
        for x in leaves:
            x.grad = None
        step_fn(*inputs).backward()

    try:
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            base = current_rss_bytes()
            step()
            peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
        times = time_steps(step, args.repeats, device)
    except torch.OutOfMemoryError:
        return {"status": "out of memory"}
    except Exception as err:  # torch.compile failures and the like: report, don't crash the table
        return {"status": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    return {"status": "ok", "time_ms": statistics.median(times), "peak_extra_mb": peak / 2**20}


def time_steps(step, repeats: int, device: str) -> list[float]:
    step()  # warm-up (the first call above may have compiled)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


# ---------------------------------------------------------------- precision (bf16, near-identical)
PRECISION = {"n": 64, "h": 256, "v": 8192}
PERTURBATIONS = (1e-3, 1e-2, 1e-1)


def precision_methods() -> dict:
    """name -> loss(h, w, th) of a reverse KL (mean over tokens) from bf16 hidden states."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    from liger_kernel.transformers import LigerFusedLinearJSD
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    import vpd_kernels as vk

    chunked = LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0, compiled=False
    )
    fused_jsd = LigerFusedLinearJSD(jsd_beta=1.0)
    return {
        "vpd_kernels fused (torch)": lambda h, w, th: vk.fused_linear_distill_loss(
            h, w, th, backend="torch"
        ),
        "vpd_kernels fused (triton)": lambda h, w, th: vk.fused_linear_distill_loss(
            h, w, th, backend="triton"
        ),
        "vpd_kernels fused (torch), bf16 gradient tile": lambda h, w, th: (
            vk.fused_linear_distill_loss(h, w, th, backend="torch", backward_dtype=torch.bfloat16)
        ),
        "vpd_kernels fused (triton), bf16 gradient tile": lambda h, w, th: (
            vk.fused_linear_distill_loss(h, w, th, backend="triton", backward_dtype=torch.bfloat16)
        ),
        "vpd_kernels distill_loss on bf16 logits": lambda h, w, th: vk.distill_loss(
            h @ w.T, th @ w.T, backend="torch"
        ),
        "trl ChunkedDivergenceFunction": lambda h, w, th: ChunkedDivergenceFunction.apply(
            h, w, None, th, w, None, 1.0, 1.0, 1.0, None, 1.0, None
        )[0].mean(),
        "liger chunked JSD (beta=1)": lambda h, w, th: chunked(
            h, w, th, w, torch.zeros(len(h), dtype=torch.long, device=h.device)
        ),
        "liger fused-linear JSD (beta=1)": lambda h, w, th: fused_jsd(h, w, th, w, None),
    }


def precision_rows(device: str) -> list[dict]:
    """Every method at every perturbation, against float64 from the same bf16 inputs."""
    n, h, v = PRECISION["n"], PRECISION["h"], PRECISION["v"]
    rows = []
    for eps in PERTURBATIONS:
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(n, h, generator=g)
        weight = (torch.randn(v, h, generator=g) * 3 * h**-0.5).to(torch.bfloat16).to(device)
        teacher = hidden + eps * hidden.std() * torch.randn(n, h, generator=g)
        hidden, teacher = (x.to(torch.bfloat16).to(device) for x in (hidden, teacher))
        h64 = hidden.double().requires_grad_(True)
        log_s = torch.log_softmax(h64 @ weight.double().T, -1)
        log_t = torch.log_softmax(teacher.double() @ weight.double().T, -1)
        exact = (log_s.exp() * (log_s - log_t)).sum(-1).mean()
        (exact_grad,) = torch.autograd.grad(exact, h64)
        norm = exact_grad.norm()
        floor = float((exact_grad.to(torch.bfloat16).double() - exact_grad).norm() / norm)
        for name, loss_fn in precision_methods().items():
            x = hidden.clone().requires_grad_(True)
            try:
                loss = loss_fn(x, weight, teacher)
                (grad,) = torch.autograd.grad(loss, x)
            except Exception as err:  # a backend this machine lacks: say so in the table
                rows.append({"perturbation": eps, "method": name, "status": f"failed: {err}"[:120]})
                continue
            grad = grad.double()
            rows.append(
                {
                    "perturbation": eps,
                    "method": name,
                    "status": "ok",
                    "loss_rel_err": float(abs(loss.double() - exact) / exact),
                    "grad_rel_err": float((grad - exact_grad).norm() / norm),
                    "grad_floor": floor,
                    "cosine": float(F.cosine_similarity(grad.flatten(), exact_grad.flatten(), 0)),
                }
            )
    return rows


def precision_markdown(payload: dict) -> str:
    """The precision table as kernels/README.md shows it (a test compares the two)."""
    p = payload["precision"]
    lines = [
        f"bf16, reverse KL, N={p['n']} H={p['h']} V={p['v']} ({payload['device']}); errors "
        "against float64 from the same bf16 inputs; floor = the exact gradient rounded once to bf16.",
        "",
        "| perturbation | method | loss rel. error | grad_hidden rel. error | floor | cosine |",
        "|---|---|---|---|---|---|",
    ]
    for row in p["rows"]:
        if row["status"] != "ok":
            lines.append(f"| {row['perturbation']:g} | {row['method']} | {row['status']} | | | |")
            continue
        lines.append(
            f"| {row['perturbation']:g} | {row['method']} | {row['loss_rel_err']:.1e} "
            f"| {row['grad_rel_err']:.1e} | {row['grad_floor']:.1e} | {row['cosine']:.6f} |"
        )
    return "\n".join(lines) + "\n"


def run_precision_subprocess(args) -> dict:
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"  # the Triton rows run in the interpreter on CPU
    cmd = [sys.executable, __file__, "--precision-child"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"precision child failed: exit {proc.returncode}: {tail[:300]}")
    return {**PRECISION, "perturbations": list(PERTURBATIONS), **json.loads(lines[-1])}


# ---------------------------------------------------------------- hardware floors (GPU)
def cuda_median_ms(fn, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure_floors() -> dict:
    """Device copy bandwidth (bytes/s, read + write) and bf16 GEMM rate (FLOP/s)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() / (cuda_median_ms(lambda: dst.copy_(src)) / 1e3)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    gemm = 2 * 8192**3 / (cuda_median_ms(lambda: a @ a) / 1e3)
    return {"copy_bandwidth_gbs": bandwidth / 1e9, "bf16_matmul_tflops": gemm / 1e12}


def floor_ms(mode: str, args, floors: dict) -> float:
    if mode in ("logits", "topk"):  # read each input once, write the gradient once
        streams = 4 if mode == "logits" else 2
        bytes_moved = streams * args.n * args.v * getattr(torch, args.dtype).itemsize
        return bytes_moved / (floors["copy_bandwidth_gbs"] * 1e9) * 1e3
    flops = 5 * 2 * args.n * args.v * args.h
    return flops / (floors["bf16_matmul_tflops"] * 1e12) * 1e3


# ---------------------------------------------------------------- a fixed background load (CPU)
BACKGROUND_KIND = "pure-Python integer loop, one process each"


def _spin() -> None:
    """What each background worker runs until it is terminated: one busy core, no memory."""
    x = 0
    while True:
        x += 1


class BackgroundLoad:
    """`workers` busy processes for the duration of a `with` block: the same contention on any
    machine (the verifier's workers and other jobs share the cores in a real run)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.processes: list[multiprocessing.Process] = []

    def __enter__(self) -> BackgroundLoad:
        context = multiprocessing.get_context("spawn")
        self.processes = [context.Process(target=_spin, daemon=True) for _ in range(self.workers)]
        for process in self.processes:
            process.start()
        time.sleep(2.0)  # let the scheduler see them before anything is timed
        return self

    def __exit__(self, *exc) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.join()


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


# ---------------------------------------------------------------- driver
def device_slug() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def run_method_subprocess(method: str, mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--mode", mode]
    cmd += ["--n", str(args.n), "--v", str(args.v), "--h", str(args.h), "--k", str(args.k)]
    cmd += ["--dtype", args.dtype, "--repeats", str(args.repeats)]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=args.timeout, env=os.environ
        )
    except subprocess.TimeoutExpired:
        return {"status": f"failed: timed out after {args.timeout}s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": f"failed: exit {proc.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


def format_row(row: dict) -> str:
    def cell(key: str, spec: str) -> str:
        return format(row[key], spec) if key in row else "-"

    loaded = row.get("loaded", {})
    under_load = (
        f"  loaded {loaded['time_ms']:.1f} ms (x{loaded['slowdown']:.2f}, load {loaded['load_average']})"
        if "time_ms" in loaded
        else ""
    )
    return (
        f"{row['mode']:<8} {row['method']:<22} {cell('time_ms', '.1f'):>10} "
        f"{cell('peak_extra_mb', '.0f'):>10} {cell('ratio_to_vpd', '.2f'):>7} "
        f"{cell('ratio_to_floor', '.2f'):>8}  {row['status']}{under_load}"
    )


def main() -> None:
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=16384 if on_gpu else 2048, help="tokens")
    parser.add_argument(
        "--v", type=int, default=151936 if on_gpu else 32768, help="vocabulary size"
    )
    parser.add_argument(
        "--h", type=int, default=2048 if on_gpu else 512, help="hidden size (fused-linear)"
    )
    parser.add_argument("--k", type=int, default=100, help="teacher top-k (topk mode)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=20 if on_gpu else 3)
    parser.add_argument(
        "--modes",
        default="logits,fused" if on_gpu else "logits,topk,fused",
        help="comma list of logits,fused,topk",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"small sizes for a smoke run: {QUICK}"
    )
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--timeout", type=int, default=900, help="seconds per method")
    parser.add_argument(
        "--out", default=None, help="JSON path (default results/kernels-<device>.json)"
    )
    parser.add_argument("--no-precision", action="store_true", help="skip the bf16 precision table")
    parser.add_argument(
        "--background-workers",
        type=int,
        default=0,
        help=f"after each mode, time --loaded-methods again beside this many busy workers "
        f"({BACKGROUND_KIND}); 0: no loaded run",
    )
    parser.add_argument("--loaded-methods", default="eager,vpd_kernels")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--precision-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="logits", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)

    if args.child:
        print(json.dumps(run_child(args)))
        return
    if args.precision_child:
        print(json.dumps({"rows": precision_rows("cuda" if on_gpu else "cpu")}))
        return

    slug = device_slug()
    load_at_start = load_average()
    floors = measure_floors() if on_gpu else {}
    results = []
    print(
        f"device={slug} N={args.n} V={args.v} H={args.h} dtype={args.dtype} repeats={args.repeats}"
    )
    print(
        f"{'mode':<8} {'method':<22} {'time ms':>10} {'peak MB':>10} {'x vpd':>7} {'x floor':>8}"
        "  status"
    )
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"kernels-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: getattr(args, k) for k in ("n", "v", "h", "k", "dtype", "repeats")}
    payload = {
        "device": slug,
        "torch": torch.__version__,
        "config": {
            **config,
            "ref_coef": REF_COEF,
            "workload": "reverse KL + ref KL (topk: top-k + tail reverse KL; liger and trl: "
            "reverse KL alone), forward+backward",
        },
        "memory_method": "cuda max_memory_allocated delta"
        if on_gpu
        else "ru_maxrss - RSS after inputs",
        "floors": floors,
        "load_average": {"start": load_at_start, "end": load_at_start},
        "background": {"workers": args.background_workers, "kind": BACKGROUND_KIND},
        "results": results,
    }

    def write() -> None:  # after every mode, so that a run cut short keeps what it measured
        payload["load_average"]["end"] = load_average()
        out.write_text(json.dumps(payload, indent=2) + "\n")

    for mode in args.modes.split(","):
        rows = []
        for method in args.methods.split(","):
            row = {"mode": mode, "method": method, **run_method_subprocess(method, mode, args)}
            row["load_average"] = load_average()
            if floors and row.get("time_ms") is not None:
                row["ratio_to_floor"] = row["time_ms"] / floor_ms(mode, args, floors)
            rows.append(row)
        if args.background_workers:
            loaded = [r for r in rows if r["method"] in args.loaded_methods.split(",")]
            with BackgroundLoad(args.background_workers):
                for row in loaded:
                    again = run_method_subprocess(row["method"], mode, args)
                    row["loaded"] = {**again, "load_average": load_average()}
                    if "time_ms" in again and "time_ms" in row:
                        row["loaded"]["slowdown"] = again["time_ms"] / row["time_ms"]
        ours = next((r for r in rows if r["method"] == "vpd_kernels" and "time_ms" in r), None)
        for row in rows:
            if ours is not None and "time_ms" in row:
                row["ratio_to_vpd"] = row["time_ms"] / ours["time_ms"]
            print(format_row(row), flush=True)
        results += rows
        write()
    if not args.no_precision:
        payload["precision"] = run_precision_subprocess(args)
        print(precision_markdown(payload), end="")
        write()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
