#!/usr/bin/env bash
# One prepared GPU check (about 8 minutes): build with CUDA for the present GPU, run the cuda-marked
# tests, run the GPU benchmarks and print a short table last. Meant for the lent GPU machine (no
# package registry there: torch, transformers, pybind11, scikit-build-core, cmake and ninja are
# installed). Usage: bash scripts/device_check.sh   (writes logs and JSON to ${OUT:-/tmp/llmcad-device})
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/llmcad-device}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.')
echo "== GPU: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) (sm_$arch)"

echo "== build (CUDA on, sm_$arch)"
LLMCAD_CUDA=ON $python -m pip install -q --no-build-isolation --no-deps \
  -C cmake.define.CMAKE_CUDA_ARCHITECTURES="$arch" -C build-dir=build/device . >"$out/build.log" 2>&1 \
  || { tail -40 "$out/build.log"; exit 1; }
$python -c "import llmcad, json; print(json.dumps(llmcad.build_info()))" | tee "$out/build_info.json"

echo "== cuda-marked tests"
$python -m pytest -q -m cuda tests 2>&1 | tee "$out/pytest_cuda.log" | tail -15

echo "== benchmarks"
$python benchmarks/device_bench.py --json-out "$out/device_bench.json" 2>&1 | tee "$out/device_bench.log"
