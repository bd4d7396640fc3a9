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

// A launch error is reported at once; an asynchronous fault of the kernel only at the next sync, so the
// debug build synchronizes after every kernel to name the one that faulted.
void check_launch(cudaStream_t stream, const char* what) {
  check(cudaGetLastError(), what);
#ifdef LLMCAD_CUDA_DEBUG
  check(cudaStreamSynchronize(stream), what);
#else
  (void)stream;
#endif
}

// Makes `device` current for one call of this runtime (the extension's own; torch's is separate).
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceScope() { cudaSetDevice(previous_); }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
};

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

__global__ void accept_kernel(const int32_t* parents, const int32_t* tokens, const int32_t* choice, int64_t n,
                              int32_t* record) {
  int32_t* accepted = record + kAcceptRecordHeader;
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
  record[0] = static_cast<int32_t>(count);
  record[1] = choice[node];
}

__global__ void gather_kernel(const int32_t* record, int64_t count, int64_t prefix, int64_t* out) {
  int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (k >= prefix + count) return;
  int64_t j = k - prefix;
  out[k] = j < 0 ? k : prefix + record[kAcceptRecordHeader + j];
}

size_t bitset_bytes(int64_t n) { return static_cast<size_t>((n + 31) / 32) * sizeof(uint32_t); }

}  // namespace

bool available() { return device_count() > 0; }

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}

bool device_integrated(int device) {
  cudaDeviceProp prop;
  check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  return prop.integrated != 0;
}

bool debug_checks() {
#ifdef LLMCAD_CUDA_DEBUG
  return true;
#else
  return false;
#endif
}

void check_device_pointer(int device, const void* ptr, const char* what) {
  if (ptr == nullptr) throw std::invalid_argument(std::string(what) + " is a null pointer");
  DeviceScope scope(device);
  cudaPointerAttributes attr;
  cudaError_t status = cudaPointerGetAttributes(&attr, ptr);
  if (status != cudaSuccess) {
    cudaGetLastError();
    throw std::invalid_argument(std::string(what) + " is not a CUDA address: " + cudaGetErrorString(status));
  }
  switch (attr.type) {
    case cudaMemoryTypeDevice:
      if (attr.device != device)
        throw std::invalid_argument(std::string(what) + " is memory of CUDA device " + std::to_string(attr.device) +
                                    ", the call runs on device " + std::to_string(device));
      return;
    case cudaMemoryTypeManaged:
      return;
    case cudaMemoryTypeHost:
      if (attr.devicePointer == ptr) return;
      throw std::invalid_argument(std::string(what) + " is pinned host memory not mapped at the same address");
    default:
      throw std::invalid_argument(std::string(what) + " is not CUDA memory (an ordinary host address?)");
  }
}

void tree_depths(int device, const int32_t* parents, int64_t n, int32_t* depths, void* stream) {
  DeviceScope scope(device);
  depths_kernel<<<blocks_for(n), kThreads, 0, as_stream(stream)>>>(parents, n, 0, depths, nullptr);
  check_launch(as_stream(stream), "tree_depths kernel");
}

void tree_positions(int device, const int32_t* parents, int64_t n, int64_t prefix, int64_t* positions, void* stream) {
  DeviceScope scope(device);
  depths_kernel<<<blocks_for(n), kThreads, 0, as_stream(stream)>>>(parents, n, prefix, nullptr, positions);
  check_launch(as_stream(stream), "tree_positions kernel");
}

void tree_mask(int device, const int32_t* parents, int64_t n, int64_t prefix, MaskDType dtype, void* out,
               void* stream) {
  if (bitset_bytes(n) > 48 * 1024) throw std::invalid_argument("tree too large for the CUDA mask kernel (n > 393216)");
  DeviceScope scope(device);
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
  check_launch(s, "tree_mask kernel");
}

void tree_accept(int device, const int32_t* parents, const int32_t* tokens, const int32_t* choice, int64_t n,
                 int32_t* record, void* stream) {
  DeviceScope scope(device);
  accept_kernel<<<1, 1, 0, as_stream(stream)>>>(parents, tokens, choice, n, record);
  check_launch(as_stream(stream), "tree_accept kernel");
}

void commit_gather_indices(int device, const int32_t* record, int64_t count, int64_t prefix, int64_t* out,
                           void* stream) {
  if (prefix + count == 0) return;
  DeviceScope scope(device);
  gather_kernel<<<blocks_for(prefix + count), kThreads, 0, as_stream(stream)>>>(record, count, prefix, out);
  check_launch(as_stream(stream), "commit_gather_indices kernel");
}

}  // namespace cuda
}  // namespace llmcad
