// The CUDA tree kernels against their C++ CPU twins (tree_cpu.cc) at awkward sizes, with no torch:
// outputs are poisoned before each launch so an unwritten element fails. Skipped without a GPU.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

#include "llmcad/tree.h"
#include "llmcad/tree_cuda.h"

namespace {

using llmcad::MaskDType;

void cuda_ok(cudaError_t status) { ASSERT_EQ(status, cudaSuccess) << cudaGetErrorString(status); }

// Makes `device` current for a scope (the test's own calls), then restores the previous one.
struct OnDevice {
  explicit OnDevice(int device) {
    cudaGetDevice(&previous);
    cudaSetDevice(device);
  }
  ~OnDevice() { cudaSetDevice(previous); }
  int previous = 0;
};

// A device buffer of `count` T on `device`, poisoned, freed at scope exit.
template <typename T>
struct DeviceArray {
  explicit DeviceArray(size_t count, int device = 0) : count(count), device(device) {
    OnDevice on(device);
    if (cudaMalloc(&ptr, count * sizeof(T) + 1) != cudaSuccess) throw std::runtime_error("cudaMalloc");
    cudaMemset(ptr, 0xAB, count * sizeof(T));
    cudaDeviceSynchronize();
  }
  ~DeviceArray() {
    OnDevice on(device);
    cudaFree(ptr);
  }
  void upload(const std::vector<T>& host) {
    OnDevice on(device);
    cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  std::vector<T> download(size_t n) const {  // after every kernel queued on this device has run
    OnDevice on(device);
    std::vector<T> host(n);
    cudaDeviceSynchronize();
    cudaMemcpy(host.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost);
    return host;
  }
  T* ptr = nullptr;
  size_t count;
  int device;
};

std::vector<int32_t> random_tree(int64_t n, std::mt19937& rng, int window) {
  std::vector<int32_t> parents(n, -1);
  for (int64_t i = 1; i < n; ++i) {
    int64_t low = window > 0 ? std::max<int64_t>(0, i - window) : 0;
    parents[i] = std::uniform_int_distribution<int32_t>(static_cast<int32_t>(low), static_cast<int32_t>(i - 1))(rng);
  }
  return parents;
}

void expect_plan_matches_cpu(const std::vector<int32_t>& parents, int64_t prefix, int device) {
  int64_t n = static_cast<int64_t>(parents.size());
  DeviceArray<int32_t> d_parents(n, device), d_depths(n, device);
  DeviceArray<int64_t> d_positions(n, device);
  d_parents.upload(parents);
  llmcad::cuda::tree_depths(device, d_parents.ptr, n, d_depths.ptr, nullptr);
  llmcad::cuda::tree_positions(device, d_parents.ptr, n, prefix, d_positions.ptr, nullptr);
  std::vector<int32_t> depths(n);
  std::vector<int64_t> positions(n);
  llmcad::tree_depths(parents.data(), n, depths.data());
  llmcad::tree_positions(parents.data(), n, prefix, positions.data());
  EXPECT_EQ(d_depths.download(n), depths) << "n=" << n;
  EXPECT_EQ(d_positions.download(n), positions) << "n=" << n << " prefix=" << prefix;
  size_t cells = static_cast<size_t>(n * (prefix + n));
  for (MaskDType dtype : {MaskDType::F32, MaskDType::F16, MaskDType::BF16}) {
    size_t elem = dtype == MaskDType::F32 ? 4 : 2;
    DeviceArray<uint8_t> d_mask(cells * elem, device);
    std::vector<uint8_t> mask(cells * elem);
    llmcad::cuda::tree_mask(device, d_parents.ptr, n, prefix, dtype, d_mask.ptr, nullptr);
    llmcad::tree_mask(parents.data(), n, prefix, dtype, mask.data());
    EXPECT_EQ(d_mask.download(cells * elem), mask) << "n=" << n << " prefix=" << prefix << " dtype=" << int(dtype);
  }
}

void expect_accept_matches_cpu(const std::vector<int32_t>& parents, std::mt19937& rng, int64_t prefix, int device) {
  int64_t n = static_cast<int64_t>(parents.size());
  std::vector<int32_t> tokens(n), choice(n);
  for (auto* v : {&tokens, &choice})
    for (auto& x : *v) x = std::uniform_int_distribution<int32_t>(0, 2)(rng);
  std::vector<int32_t> accepted(n);
  int32_t bonus = -1;
  int64_t count = llmcad::tree_accept(parents.data(), tokens.data(), choice.data(), n, accepted.data(), &bonus);
  accepted.resize(count);
  std::vector<int64_t> keep(prefix + count);
  llmcad::commit_gather_indices(accepted.data(), count, prefix, keep.data());

  DeviceArray<int32_t> d_parents(n, device), d_tokens(n, device), d_choice(n, device), d_record(n + 2, device);
  d_parents.upload(parents);
  d_tokens.upload(tokens);
  d_choice.upload(choice);
  llmcad::cuda::tree_accept(device, d_parents.ptr, d_tokens.ptr, d_choice.ptr, n, d_record.ptr, nullptr);
  std::vector<int32_t> record = d_record.download(n + 2);
  ASSERT_EQ(record[0], count) << "n=" << n;
  EXPECT_EQ(record[1], bonus);
  EXPECT_EQ(std::vector<int32_t>(record.begin() + 2, record.begin() + 2 + count), accepted);
  DeviceArray<int64_t> d_keep(prefix + count, device);
  llmcad::cuda::commit_gather_indices(device, d_record.ptr, count, prefix, d_keep.ptr, nullptr);
  EXPECT_EQ(d_keep.download(prefix + count), keep);
}

const int64_t kSizes[] = {1, 2, 7, 31, 32, 33, 63, 64, 65, 257, 1000, 1025};
const int64_t kPrefixes[] = {0, 5, 64, 129};

TEST(TreeCuda, PlanMatchesCpuTwin) {
  if (!llmcad::cuda::available()) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(7);
  for (int64_t n : kSizes)
    for (int window : {0, 2})
      for (int64_t prefix : kPrefixes) expect_plan_matches_cpu(random_tree(n, rng, window), prefix, 0);
}

TEST(TreeCuda, AcceptAndCommitMatchCpuTwin) {
  if (!llmcad::cuda::available()) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(11);
  for (int64_t n : kSizes)
    for (int trial = 0; trial < 20; ++trial) expect_accept_matches_cpu(random_tree(n, rng, trial % 3), rng, 9, 0);
}

TEST(TreeCuda, PointerCheckNamesTheProblem) {
  if (!llmcad::cuda::available()) GTEST_SKIP() << "no CUDA device";
  DeviceArray<int32_t> on_device(4);
  EXPECT_NO_THROW(llmcad::cuda::check_device_pointer(0, on_device.ptr, "parents"));
  std::vector<int32_t> host(4);
  EXPECT_THROW(llmcad::cuda::check_device_pointer(0, host.data(), "parents"), std::invalid_argument);
  EXPECT_THROW(llmcad::cuda::check_device_pointer(0, nullptr, "parents"), std::invalid_argument);
  try {
    llmcad::cuda::check_device_pointer(0, host.data(), "choice");
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("choice"), std::string::npos) << e.what();
  }
}

TEST(TreeCuda, SecondDeviceIsHonoured) {
  if (!llmcad::cuda::available()) GTEST_SKIP() << "no CUDA device";
  if (llmcad::cuda::device_count() < 2) GTEST_SKIP() << "one CUDA device";
  std::mt19937 rng(3);
  cudaSetDevice(0);  // the caller's current device stays 0: the call selects device 1 itself
  expect_plan_matches_cpu(random_tree(65, rng, 2), 7, 1);
  expect_accept_matches_cpu(random_tree(65, rng, 2), rng, 7, 1);
  int current = -1;
  cuda_ok(cudaGetDevice(&current));
  EXPECT_EQ(current, 0) << "a call on device 1 left device 1 current";
  DeviceArray<int32_t> on_zero(4, 0);
  EXPECT_THROW(llmcad::cuda::check_device_pointer(1, on_zero.ptr, "parents"), std::invalid_argument);
}

}  // namespace
