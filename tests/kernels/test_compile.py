"""The Triton kernels compile for Hopper (sm_90) without register spills, checked on any machine:
Triton and its bundled ptxas compile for a target GPU without one (the interpreter that the
other tests use never compiles). Runs in a subprocess because TRITON_INTERPRET=1 is set here."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

SCRIPT = r"""
import json, re, subprocess, sys, tempfile
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource, compile
from vpd_kernels.ops import distill, logprobs, topk
from vpd_kernels.ops.tiles import pick_tiles

FLOATS = {"inv_temp", "beta", "div_coef", "ref_coef", "ce_coef"}
BF16 = "*bf16"
FLAGS = {"HAS_REF": True, "HAS_CE": True, "NEED_P": True, "WRITE_GRAD": True}
V = 151936  # Qwen's vocabulary: long rows, the largest tiles
rows, block_v, warps = pick_tiles(V, None)
WIDE = {"BLOCK_ROWS": rows, "BLOCK_V": block_v, "num_warps": warps}
rows, block_v, warps = pick_tiles(V, None, topk.TILE_ELEMENTS)
WIDE_TOPK = {"BLOCK_ROWS": rows, "BLOCK_V": block_v, "num_warps": warps, "BLOCK_K": 128}
VARIANTS = {
    "distill jsd + ref + ce": (distill._distill_kernel, {"DIVERGENCE": 2, **FLAGS, **WIDE}),
    "distill reverse_kl": (distill._distill_kernel, {
        "DIVERGENCE": 0, "HAS_REF": False, "HAS_CE": False, "NEED_P": False,
        "WRITE_GRAD": True, **WIDE}),
    "topk teacher logits + tail + ref + ce": (topk._topk_kernel, {
        "DIVERGENCE": 2, "TAIL": True, "TEACHER_LOGITS": True, **FLAGS, **WIDE_TOPK}),
    "topk given log-probs + tail": (topk._topk_kernel, {
        "DIVERGENCE": 0, "TAIL": True, "TEACHER_LOGITS": False, "HAS_REF": False,
        "HAS_CE": False, "NEED_P": False, "WRITE_GRAD": True, **WIDE_TOPK}),
    "logprobs forward": (logprobs._logprobs_fwd_kernel, WIDE),
    "logprobs backward": (logprobs._logprobs_bwd_kernel, WIDE),
}
POINTERS = {"s_ptr": BF16, "t_ptr": BF16, "r_ptr": BF16, "g_ptr": BF16, "x_ptr": BF16,
            "label_ptr": "*i64", "ids_ptr": "*i64", "tok_ptr": "*i64"}
results = {}
for (name, (fn, constexprs)), ints in [(v, i) for v in VARIANTS.items() for i in ("i32", "i64")]:
    name = f"{name} ({ints} sizes and strides)"
    constexprs = dict(constexprs)
    num_warps = constexprs.pop("num_warps")
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = POINTERS.get(arg, "*fp32")
        else:
            signature[arg] = "fp32" if arg in FLOATS else ints
    index = {arg: i for i, arg in enumerate(fn.arg_names)}
    source = ASTSource(fn, signature, {(index[k],): v for k, v in constexprs.items()})
    kernel = compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = f"{tmp}/k.ptx"
        open(ptx, "w").write(kernel.asm["ptx"])
        report = subprocess.run(
            [get_ptxas(90).path, "--gpu-name", "sm_90a", "-v", ptx, "-o", f"{tmp}/k.cubin"],
            capture_output=True, text=True, check=True,
        ).stderr
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    results[name] = {"spill_bytes": sum(spills), "registers": registers}
print(json.dumps(results))
"""


def test_kernels_compile_for_hopper_without_spills():
    importlib.import_module("triton.backends.nvidia.compiler")  # ships with triton on Linux
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.splitlines()[-1])
    spilling = {name: r for name, r in results.items() if r["spill_bytes"]}
    assert not spilling, f"register spills on sm_90: {spilling} (all: {results})"
