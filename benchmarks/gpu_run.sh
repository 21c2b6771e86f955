#!/usr/bin/env bash
# Everything this repository wants to know from one H100 / H200, in one command of at most 8
# minutes, each part under its own time budget and writing its results into OUT_DIR as it ends:
#
#   env.json             torch / triton / GPU / package versions
#   gpu-tests.xml, .log  pytest -m gpu (real Triton compilation, production vocabularies)
#   cost-model.md        benchmarks/cost_model.py at the rates bench-h2048.json measured
#   bench-h2048.json     bench_kernels.py at N=16384, V=151936, H=2048: fused-linear, logits-in;
#                        eager, torch.compile, Liger, TRL, vpd_kernels with the bf16 gradient tile
#                        (the CUDA default) and the float32 one; x the HBM / GEMM floor
#   bench-h4096.json     the fused-linear rows again at H=4096 (the cost model's other shape)
#   model-step.json      one training step of a random-initialised Qwen3-0.6B-shaped model,
#                        8 x 2048 tokens: phase times and peak memory per loss variant
#   summary.json         each part's exit status, seconds and budget (rewritten after each part)
#
# The device has torch 2.11, triton 3.6, lightning, transformers, peft, torchmetrics; TRL and
# Liger (and TRL's `datasets`) travel as wheels: run `bash benchmarks/gpu_wheels.sh` here first,
# then carry `.whl`. No hub, no weights, no network there.
#
#   bash benchmarks/gpu_run.sh "$OUT"            # on the GPU machine
#   bash benchmarks/gpu_run.sh --dry-run /tmp/x  # the same code at tiny shapes on the CPU
set -u
DRY=0
if [ "${1:-}" = "--dry-run" ]; then
  DRY=1
  shift
fi
OUT=${1:?usage: benchmarks/gpu_run.sh [--dry-run] OUT_DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"

if [ "$DRY" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then  # the dry run uses what is here
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/vpd-site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/vpd-site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The package folder is kernels/ but imports as vpd_kernels (as pip -e sets it up).
SHIM=$(mktemp -d)
ln -s "$ROOT/kernels" "$SHIM/vpd_kernels"
ln -s "$ROOT/vpd_lightning" "$SHIM/vpd_lightning"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DRY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
  TESTS=(-m gpu --collect-only)  # they need CUDA; collecting them checks they import
  BENCH=(--n 64 --v 512 --h 32 --repeats 1 --modes fused --timeout 60 --no-precision)
  METHODS=eager,vpd_kernels,vpd_kernels/bwd=bfloat16  # on a CPU the default tile is float32
  WIDE=(--n 64 --v 512 --h 64 --repeats 1 --no-precision)
  STEP=(--tiny --device cpu --batch 2 --seq 16 --warmup 0 --steps 1)
else
  TESTS=(-m gpu)
  BENCH=(--n 16384 --v 151936 --h 2048 --repeats 5 --modes fused,logits --timeout 60)
  METHODS=eager,torch.compile,liger,trl,vpd_kernels,vpd_kernels/bwd=float32
  WIDE=(--n 16384 --v 151936 --h 4096 --repeats 5 --no-precision --timeout 30)
  STEP=(--batch 8 --seq 2048 --warmup 1 --steps 2)
fi

PARTS="[]"
# part NAME BUDGET_SECONDS COMMAND...: run it under `timeout`, log to OUT/NAME.log, record it
part() {
  local name=$1 budget=$2
  shift 2
  local start=$SECONDS
  echo "== $name (budget ${budget}s)"
  timeout --kill-after=10 "$budget" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  PARTS=$("$PY" -c 'import json, sys; p = json.loads(sys.argv[1]); p.append(dict(part=sys.argv[2], rc=int(sys.argv[3]), seconds=int(sys.argv[4]), budget=int(sys.argv[5]), timed_out=sys.argv[3] in ("124", "137"))); print(json.dumps(p))' \
    "$PARTS" "$name" "$rc" "$((SECONDS - start))" "$budget")
  echo "{\"dry_run\": $DRY, \"parts\": $PARTS}" >"$OUT/summary.json"
}

part env 20 "$PY" -c '
import json, sys, importlib.metadata as md, torch, triton
names = ["torch", "triton", "transformers", "lightning", "peft", "trl", "liger-kernel", "datasets", "pyarrow"]
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
env = {n: version(n) for n in names}
env["cuda"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(env)' "$OUT/env.json"
part gpu-tests 75 "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" tests/kernels \
  --junitxml "$OUT/gpu-tests.xml"
part bench-h2048 240 "$PY" benchmarks/bench_kernels.py "${BENCH[@]}" --methods "$METHODS" \
  --out "$OUT/bench-h2048.json"
part cost-model 15 "$PY" -c '
import json, subprocess, sys
floors = json.load(open(sys.argv[1])).get("floors") or {}
rates = ["--bf16-tflops", str(floors["bf16_matmul_tflops"]), "--hbm-tbs", str(floors["copy_bandwidth_gbs"] / 1e3)] if floors else []
table = subprocess.run([sys.executable, "benchmarks/cost_model.py", *rates], check=True, capture_output=True, text=True).stdout
open(sys.argv[2], "w").write(table)
print(table)' "$OUT/bench-h2048.json" "$OUT/cost-model.md"
part bench-h4096 45 "$PY" benchmarks/bench_kernels.py "${WIDE[@]}" --modes fused \
  --methods vpd_kernels,vpd_kernels/bwd=float32 --out "$OUT/bench-h4096.json"
part model-step 80 "$PY" benchmarks/model_step.py "${STEP[@]}" --out "$OUT/model-step.json"
rm -rf "$SHIM"
echo "== done in ${SECONDS}s: $OUT/summary.json"
