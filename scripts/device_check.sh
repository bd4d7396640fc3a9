#!/usr/bin/env bash
# The one prepared GPU check for a lent machine: builds for the present GPU, proves each GPU claim and
# prints ONE table of checks and figures last. Well inside 8 minutes on a fresh box (hard budget
# $BUDGET_S, default 420 s; each stage has its own cap; a lent session may pass BUDGET_S=540). Nothing is fetched: torch, transformers,
# pybind11, scikit-build-core, cmake, ninja and nvcc are on the machine (build/pydeps is used for a
# missing pytest). Each stage's failure is reported; later stages still run.
#
# | check            | how                                                                            |
# | build            | pip install . with CUDA for this GPU's arch (no deps, no isolation)             |
# | ctest-cuda       | csrc/tests/test_tree_cuda.cc: CUDA kernels vs the C++ CPU twins, no torch,       |
# |                  | built with LLMCAD_CUDA_DEBUG (sync + error check after every kernel)            |
# | memcheck         | compute-sanitizer --tool memcheck of that test (where the tool exists)          |
# | kernels          | tests/test_tree_cuda.py: kernels vs NumPy, binding checks, a second device      |
# | lossless-greedy  | tests/test_gpu.py: token for token with transformers' generate on the GPU,      |
# |                  | resident and streamed, copy and zero-copy paths                                 |
# | lossless-sampled | seeded sampling: streamed = resident seed for seed (copy, zero-copy), top_k=1 = |
# |                  | greedy, first two tokens' joint frequency vs the target's (chi-square)          |
# | provisional      | provisional drafting counted on the GPU (copy path, slow reads, no lockstep)    |
# | fp16-bitwise     | fp16 streamed logits equal resident logits bit for bit (copy, zero-copy)        |
# | release-order    | slow kernels before each layer / each upload: logits unchanged (stress)         |
# | transfers        | tests/test_gpu_transfers.py: device-to-host transfers per round within budget   |
# | stub-streams     | tests/test_gpu_upload.py: the ring's bookkeeping (CPU stubs), on this machine   |
# | h2d              | upload ring from prefilled pinned buffers vs ONE large pinned cudaMemcpy (GB/s) |
# | timeline         | CUDA events of one streamed pass: share of compute overlapped by an upload      |
# | tree_plan, streamed_pass, e2e | kernel, cold-pass overlap and tokens/s ratios (device_bench.py)    |
#
#   bash scripts/device_check.sh     # six files in ${OUT:-/tmp/llmcad-device}: check.log (this output),
#                                    # table.md, stages.log (every stage's full log), report.jsonl
#                                    # (the tests' figures), device_bench.json, pytest.xml
#   SKIP_BUILD=1 / BUDGET_S=540 / PYTHON=python3.12   (optional)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${OUT:-/tmp/llmcad-device}
mkdir -p "$out"
work=$(mktemp -d)
export PYTHONUNBUFFERED=1 LLMCAD_DEVICE_REPORT="$out/report.jsonl"
: >"$LLMCAD_DEVICE_REPORT"
python=${PYTHON:-python3}
budget=${BUDGET_S:-420}
start=$SECONDS
declare -a rows=()
exec > >(tee "$out/check.log") 2>&1

left() { echo $((budget - (SECONDS - start))); }

# stage NAME MAX_SECONDS COMMAND...: runs COMMAND under min(MAX, time left); its log goes to $work.
stage() {
  local name=$1 max=$2
  shift 2
  local limit
  limit=$(left)
  ((limit > max)) && limit=$max
  if ((limit < 15)); then
    echo "== $name: SKIPPED (time budget spent)"
    rows+=("$name|skipped|0")
    return 0
  fi
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" bash -c '"$@"' stage "$@" >"$work/$name.log" 2>&1
  rc=$?
  tail -n "${TAIL_LINES:-8}" "$work/$name.log"
  local status=ok
  ((rc == 124 || rc == 137)) && status=timeout
  ((rc != 0 && rc != 124 && rc != 137)) && status="failed(rc=$rc)"
  ((rc == 99)) && status="not available"
  echo "-- $name: $status in $((SECONDS - t0))s"
  rows+=("$name|$status|$((SECONDS - t0))")
}

if ! "$python" -c "import pytest" 2>/dev/null && [ -d build/pydeps ]; then
  export PYTHONPATH="$PWD/build/pydeps${PYTHONPATH:+:$PYTHONPATH}"
fi

arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '.[:space:]')
[ -n "$arch" ] || arch=$("$python" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())" 2>/dev/null)
arch=${arch:-90}
gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
header="$(date -u +%FT%TZ) GPU: ${gpu:-unknown} (sm_$arch); $("$python" -c 'import sys, torch, transformers
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__)' 2>&1)"
echo "== $header"

build() {
  LLMCAD_CUDA=ON "$python" -m pip install -q --no-build-isolation --no-deps \
    -C cmake.define.CMAKE_CUDA_ARCHITECTURES="$arch" -C build-dir=build/device . &&
    (cd /tmp && "$python" -c "import llmcad, json; info = llmcad.build_info(); print(json.dumps(info)); \
assert info['cuda_compiled'] and info['cuda_available'], 'CUDA not compiled or not usable'")
}

# The C++ test of the CUDA kernels against the CPU twins, in a debug build (every kernel synced and
# checked), then the same binary under compute-sanitizer's memcheck.
ctest_cuda() {
  cmake -S . -B build/device-ctest -G Ninja -DLLMCAD_CUDA=ON -DLLMCAD_CUDA_DEBUG=ON -DLLMCAD_BUILD_PYTHON=OFF \
    -DLLMCAD_BUILD_TESTS=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null &&
    cmake --build build/device-ctest --target test_tree_cuda -j "$(nproc)" >/dev/null &&
    ctest --test-dir build/device-ctest -R test_tree_cuda --output-on-failure
}

memcheck() {
  local sanitizer
  sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
  if [ -z "$sanitizer" ]; then
    echo "compute-sanitizer not found: memcheck not run"
    return 99
  fi
  "$sanitizer" --tool memcheck --leak-check full --error-exitcode 9 build/device-ctest/csrc/tests/test_tree_cuda
}

pytest_gpu() {
  # the installed package is tested (python/ is not on sys.path, as in CI)
  "$python" -m pytest -q -rs -p no:cacheprovider tests/test_tree_cuda.py tests/test_gpu.py tests/test_gpu_transfers.py \
    tests/test_gpu_upload.py --junitxml="$out/pytest.xml"
}

export python arch out
export -f build ctest_cuda memcheck pytest_gpu
if [ -z "${SKIP_BUILD:-}" ]; then
  stage build 180 build
fi
stage ctest-cuda 100 ctest_cuda
stage memcheck 60 memcheck
stage pytest 220 pytest_gpu
TAIL_LINES=30 stage bench 120 "$python" benchmarks/device_bench.py --only h2d timeline tree_plan streamed_pass e2e \
  --json-out "$out/device_bench.json"
for name in build ctest-cuda memcheck pytest bench; do
  [ -f "$work/$name.log" ] && { echo "===== $name"; cat "$work/$name.log"; }
done >"$out/stages.log"

{
  echo "$header"
  "$python" scripts/device_table.py "$out" "${rows[@]}"
} | tee "$out/table.md"
echo "total $((SECONDS - start))s; files in $out"
rm -rf "$work"
