// Kernel benchmark: planning a 64-, 256- and 1024-node tree (depths, positions, fp32 mask over
// 512 prefix keys + n, acceptance walk). CPU always; CUDA variants when CUDA is compiled and a GPU is
// present. Reported as the median over repetitions, in microseconds.
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "llmcad/tree.h"
#ifdef LLMCAD_WITH_CUDA
#include <cuda_runtime.h>

#include "llmcad/tree_cuda.h"
#endif

namespace {
constexpr int64_t kPrefix = 512;

std::vector<int32_t> random_tree(int64_t n) {
  std::mt19937 rng(42);
  std::vector<int32_t> parents(n, -1);
  for (int64_t i = 1; i < n; ++i) parents[i] = std::uniform_int_distribution<int32_t>(std::max<int64_t>(0, i - 4), i - 1)(rng);
  return parents;
}

void BM_TreePlanCPU(benchmark::State& state) {
  int64_t n = state.range(0);
  auto parents = random_tree(n);
  std::vector<int32_t> tokens(n, 1), choice(n, 1), accepted(n);
  std::vector<int64_t> positions(n);
  std::vector<float> mask(static_cast<size_t>(n * (kPrefix + n)));
  for (auto _ : state) {
    int32_t bonus;
    llmcad::tree_positions(parents.data(), n, kPrefix, positions.data());
    llmcad::tree_mask(parents.data(), n, kPrefix, llmcad::MaskDType::F32, mask.data());
    int64_t count = llmcad::tree_accept(parents.data(), tokens.data(), choice.data(), n, accepted.data(), &bonus);
    benchmark::DoNotOptimize(count);
    benchmark::DoNotOptimize(mask.data());
  }
}
BENCHMARK(BM_TreePlanCPU)->Arg(64)->Arg(256)->Arg(1024)->Unit(benchmark::kMicrosecond);

#ifdef LLMCAD_WITH_CUDA
void BM_TreePlanCUDA(benchmark::State& state) {
  int64_t n = state.range(0);
  if (!llmcad::cuda::available()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  auto parents = random_tree(n);
  int32_t *d_parents, *d_tokens, *d_record;
  int64_t* d_positions;
  float* d_mask;
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  cudaMalloc(&d_parents, n * 4); cudaMalloc(&d_tokens, n * 4); cudaMalloc(&d_record, (n + 2) * 4);
  cudaMalloc(&d_positions, n * 8);
  cudaMalloc(&d_mask, n * (kPrefix + n) * 4);
  cudaMemcpy(d_parents, parents.data(), n * 4, cudaMemcpyHostToDevice);
  cudaMemset(d_tokens, 0, n * 4);
  for (auto _ : state) {
    llmcad::cuda::tree_positions(0, d_parents, n, kPrefix, d_positions, stream);
    llmcad::cuda::tree_mask(0, d_parents, n, kPrefix, llmcad::MaskDType::F32, d_mask, stream);
    llmcad::cuda::tree_accept(0, d_parents, d_tokens, d_tokens, n, d_record, stream);
    cudaStreamSynchronize(stream);
  }
  cudaFree(d_parents); cudaFree(d_tokens); cudaFree(d_record); cudaFree(d_positions); cudaFree(d_mask);
  cudaStreamDestroy(stream);
}
BENCHMARK(BM_TreePlanCUDA)->Arg(64)->Arg(256)->Arg(1024)->Unit(benchmark::kMicrosecond)->UseRealTime();
#endif
}  // namespace

BENCHMARK_MAIN();
