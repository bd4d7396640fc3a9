// CUDA twins of the tree planning routines (see tree_cuda.h). The binding layer validates the tree.
#include <cuda_runtime.h>

#include <limits>
#include <stdexcept>
#include <string>

#include "llmcad/tree_cuda.h"

namespace llmcad {
namespace cuda {
namespace {

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

constexpr int kThreads = 256;
int blocks_for(int64_t count) { return static_cast<int>((count + kThreads - 1) / kThreads); }

__device__ int32_t depth_of(const int32_t* parents, int64_t i) {
  int32_t d = 0;
  for (int64_t a = i; parents[a] >= 0; a = parents[a]) ++d;
  return d;
}

__global__ void depths_kernel(const int32_t* parents, int64_t n, int64_t prefix, int32_t* depths, int64_t* positions) {
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  int32_t d = depth_of(parents, i);
  if (depths) depths[i] = d;
  if (positions) positions[i] = prefix + d;
}

// One block per row; the row's ancestor set lives in shared memory as a bitset of n bits.
__device__ void load_ancestors(const int32_t* parents, int64_t row, int64_t n, uint32_t* bits) {
  int64_t words = (n + 31) / 32;
  for (int64_t w = threadIdx.x; w < words; w += blockDim.x) bits[w] = 0;
  __syncthreads();
  if (threadIdx.x == 0)
    for (int64_t a = row; a >= 0; a = parents[a]) bits[a >> 5] |= 1u << (a & 31);
  __syncthreads();
}

template <typename T>
__global__ void mask_kernel(const int32_t* parents, int64_t n, int64_t prefix, T zero, T neg_inf, T* out) {
  extern __shared__ uint32_t bits[];
  int64_t row = blockIdx.x;
  load_ancestors(parents, row, n, bits);
  int64_t cols = prefix + n;
  T* dst = out + row * cols;
  for (int64_t k = threadIdx.x; k < cols; k += blockDim.x) {
    int64_t j = k - prefix;
    bool visible = j < 0 || ((bits[j >> 5] >> (j & 31)) & 1u);
    dst[k] = visible ? zero : neg_inf;
  }
}

__global__ void packed_kernel(const int32_t* parents, int64_t n, int64_t prefix, int64_t words, uint64_t* out) {
  extern __shared__ uint32_t bits[];
  int64_t row = blockIdx.x;
  load_ancestors(parents, row, n, bits);
  for (int64_t w = threadIdx.x; w < words; w += blockDim.x) {
    uint64_t word = 0;
    for (int b = 0; b < 64; ++b) {
      int64_t k = w * 64 + b;
      if (k >= prefix + n) break;
      int64_t j = k - prefix;
      bool visible = j < 0 || ((bits[j >> 5] >> (j & 31)) & 1u);
      if (visible) word |= uint64_t{1} << b;
    }
    out[row * words + w] = word;
  }
}

__global__ void paths_kernel(const int32_t* parents, const int32_t* leaves, int64_t num_leaves, int32_t width,
                             int32_t* paths) {
  int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= num_leaves) return;
  int32_t* dst = paths + r * width;
  for (int32_t k = 0; k < width; ++k) dst[k] = -1;
  int64_t leaf = leaves[r];
  int32_t d = depth_of(parents, leaf);
  for (int64_t a = leaf; a >= 0; a = parents[a]) dst[d--] = static_cast<int32_t>(a);
}

__global__ void accept_kernel(const int32_t* parents, const int32_t* tokens, const int32_t* choice, int64_t n,
                              int32_t* accepted, int64_t* num_accepted, int32_t* bonus) {
  int64_t count = 0, node = 0;
  accepted[count++] = 0;
  for (;;) {
    int64_t next = -1;
    for (int64_t c = node + 1; c < n; ++c)
      if (parents[c] == node && tokens[c] == choice[node]) { next = c; break; }
    if (next < 0) break;
    accepted[count++] = static_cast<int32_t>(next);
    node = next;
  }
  *num_accepted = count;
  *bonus = choice[node];
}

__global__ void gather_kernel(const int32_t* accepted, const int64_t* num_accepted, int64_t max_accepted,
                              int64_t prefix, int64_t* out) {
  int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (k >= prefix + max_accepted) return;
  int64_t j = k - prefix;
  out[k] = j < 0 ? k : (j < *num_accepted ? prefix + accepted[j] : -1);
}

size_t bitset_bytes(int64_t n) { return static_cast<size_t>((n + 31) / 32) * sizeof(uint32_t); }

void check_rows(int64_t n) {
  if (bitset_bytes(n) > 48 * 1024) throw std::invalid_argument("tree too large for the CUDA mask kernel (n > 393216)");
}

}  // namespace

bool available() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return false;
  }
  return count > 0;
}

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) { cudaGetLastError(); return 0; }
  return count;
}

bool device_integrated(int device) {
  cudaDeviceProp prop;
  check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  return prop.integrated != 0;
}

void tree_depths(const int32_t* parents, int64_t n, int32_t* depths, void* stream) {
  depths_kernel<<<blocks_for(n), kThreads, 0, as_stream(stream)>>>(parents, n, 0, depths, nullptr);
  check(cudaGetLastError(), "tree_depths launch");
}

void tree_positions(const int32_t* parents, int64_t n, int64_t prefix, int64_t* positions, void* stream) {
  depths_kernel<<<blocks_for(n), kThreads, 0, as_stream(stream)>>>(parents, n, prefix, nullptr, positions);
  check(cudaGetLastError(), "tree_positions launch");
}

void tree_mask(const int32_t* parents, int64_t n, int64_t prefix, MaskDType dtype, void* out, void* stream) {
  check_rows(n);
  size_t shared = bitset_bytes(n);
  cudaStream_t s = as_stream(stream);
  int rows = static_cast<int>(n);
  switch (dtype) {
    case MaskDType::F32:
      mask_kernel<float><<<rows, kThreads, shared, s>>>(parents, n, prefix, 0.0f, -std::numeric_limits<float>::infinity(),
                                                        static_cast<float*>(out));
      break;
    case MaskDType::F16:  // -inf bit patterns
      mask_kernel<uint16_t><<<rows, kThreads, shared, s>>>(parents, n, prefix, 0, 0xfc00u, static_cast<uint16_t*>(out));
      break;
    case MaskDType::BF16:
      mask_kernel<uint16_t><<<rows, kThreads, shared, s>>>(parents, n, prefix, 0, 0xff80u, static_cast<uint16_t*>(out));
      break;
    default:
      throw std::invalid_argument("unknown mask dtype code");
  }
  check(cudaGetLastError(), "tree_mask launch");
}

void tree_mask_packed(const int32_t* parents, int64_t n, int64_t prefix, uint64_t* out, void* stream) {
  check_rows(n);
  int64_t words = packed_mask_words(n, prefix);
  packed_kernel<<<static_cast<int>(n), 64, bitset_bytes(n), as_stream(stream)>>>(parents, n, prefix, words, out);
  check(cudaGetLastError(), "tree_mask_packed launch");
}

void tree_paths(const int32_t* parents, int64_t n, const int32_t* leaves, int64_t num_leaves, int32_t max_depth,
                int32_t* paths, void* stream) {
  (void)n;
  paths_kernel<<<blocks_for(num_leaves), kThreads, 0, as_stream(stream)>>>(parents, leaves, num_leaves, max_depth + 1, paths);
  check(cudaGetLastError(), "tree_paths launch");
}

void tree_accept(const int32_t* parents, const int32_t* tokens, const int32_t* choice, int64_t n, int32_t* accepted,
                 int64_t* num_accepted, int32_t* bonus, void* stream) {
  accept_kernel<<<1, 1, 0, as_stream(stream)>>>(parents, tokens, choice, n, accepted, num_accepted, bonus);
  check(cudaGetLastError(), "tree_accept launch");
}

void commit_gather_indices(const int32_t* accepted, const int64_t* num_accepted, int64_t max_accepted, int64_t prefix,
                           int64_t* out, void* stream) {
  gather_kernel<<<blocks_for(prefix + max_accepted), kThreads, 0, as_stream(stream)>>>(accepted, num_accepted,
                                                                                      max_accepted, prefix, out);
  check(cudaGetLastError(), "commit_gather_indices launch");
}

}  // namespace cuda
}  // namespace llmcad
