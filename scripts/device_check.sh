#!/usr/bin/env bash
# One prepared GPU check (about 8 minutes, hard budget $BUDGET_S, default 480 s): build with CUDA for the
# present GPU, run the cuda-marked tests, the ctest CUDA kernel benchmark and the GPU benchmarks, and print
# a short table last. Meant for a lent GPU machine (no package registry there: torch, transformers,
# pybind11, scikit-build-core, cmake, ninja and nvcc are installed; when pytest is missing, the copy the
# session carried in build/pydeps is used). Each stage's failure is reported; later stages still run.
#
#   bash scripts/device_check.sh        # logs and JSON in ${OUT:-/tmp/llmcad-device}
#   SKIP_BUILD=1 / SKIP_CTEST=1 / BUDGET_S=540 / PYTHON=python3.10   (optional)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/llmcad-device}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
budget=${BUDGET_S:-480}
start=$SECONDS
declare -a summary=()

left() { echo $((budget - (SECONDS - start))); }

# stage NAME MAX_SECONDS COMMAND...: runs COMMAND under min(MAX, time left), logs to $out/NAME.log.
stage() {
  local name=$1 max=$2
  shift 2
  local limit
  limit=$(left)
  ((limit > max)) && limit=$max
  if ((limit < 15)); then
    echo "== $name: SKIPPED (time budget spent)"
    summary+=("$name|skipped|0")
    return 0
  fi
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" bash -c '"$@"' stage "$@" >"$out/$name.log" 2>&1
  rc=$?
  tail -n "${TAIL_LINES:-12}" "$out/$name.log"
  local status=ok
  ((rc == 124 || rc == 137)) && status="timeout"
  ((rc != 0 && rc != 124 && rc != 137)) && status="failed(rc=$rc)"
  echo "-- $name: $status in $((SECONDS - t0))s"
  summary+=("$name|$status|$((SECONDS - t0))")
}

if ! $python -c "import pytest" 2>/dev/null && [ -d build/pydeps ]; then
  export PYTHONPATH="$PWD/build/pydeps${PYTHONPATH:+:$PYTHONPATH}"
fi

arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '.[:space:]')
[ -n "$arch" ] || arch=$($python -c "import torch; print('%d%d' % torch.cuda.get_device_capability())" 2>/dev/null)
arch=${arch:-90}
gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
echo "== GPU: ${gpu:-unknown} (sm_$arch); $($python -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1)"

build() {
  LLMCAD_CUDA=ON $python -m pip install -v --no-build-isolation --no-deps \
    -C cmake.define.CMAKE_CUDA_ARCHITECTURES="$arch" -C build-dir=build/device . &&
    cd /tmp && $python -c "import llmcad, json; info = llmcad.build_info(); print(json.dumps(info)); \
assert info['cuda_compiled'] and info['cuda_available'], 'CUDA not compiled or not usable'"
}
export python arch out
export -f build
if [ -z "${SKIP_BUILD:-}" ]; then
  stage build 240 build
fi
(cd /tmp && $python -c "import llmcad, json; print(json.dumps(llmcad.build_info()))") >"$out/build_info.json" 2>&1

# The installed package is tested (python/ is not on sys.path): cuda-marked tests plus the CPU bookkeeping
# tests of the upload ring.
stage tests 180 $python -m pytest -q -rs -p no:cacheprovider tests/test_tree_cuda.py tests/test_gpu.py \
  tests/test_gpu_upload.py --junitxml="$out/pytest.xml"

ctest_bench() {
  cmake -S . -B build/device-ctest -G Ninja -DLLMCAD_CUDA=ON -DLLMCAD_BUILD_PYTHON=OFF -DLLMCAD_BUILD_TESTS=ON \
    -DCMAKE_CUDA_ARCHITECTURES="$arch" >/dev/null &&
    cmake --build build/device-ctest --target bench_tree -j 8 >/dev/null &&
    ctest --test-dir build/device-ctest -R bench_tree --output-on-failure -V
}
export -f ctest_bench
if [ -z "${SKIP_CTEST:-}" ]; then
  stage ctest_bench 90 ctest_bench
fi

TAIL_LINES=40 stage bench 240 $python benchmarks/device_bench.py --json-out "$out/device_bench.json"

{
  echo
  echo "| stage | status | seconds |"
  echo "| --- | --- | --- |"
  for row in "${summary[@]}"; do echo "| ${row//|/ | } |"; done
} | tee "$out/stages.md"
$python - "$out" "${summary[@]}" <<'PY'
import json, sys
out, rows = sys.argv[1], sys.argv[2:]
stages = [dict(zip(("stage", "status", "seconds"), r.split("|"))) for r in rows]
json.dump({"stages": stages}, open(f"{out}/stages.json", "w"), indent=1)
try:
    rows = json.load(open(f"{out}/device_bench.json"))
except (OSError, ValueError):
    rows = []
print("\n| bench | configuration | figures |\n| --- | --- | --- |")
for r in rows:
    config = ", ".join(f"{k}={v}" for k, v in r.items() if k != "bench" and not isinstance(v, float))
    figures = ", ".join(f"{k}={v:.3g}" for k, v in r.items() if isinstance(v, float))
    print(f"| {r['bench']} | {config} | {figures} |")
PY
echo "total ${SECONDS}s; logs and JSON in $out"
