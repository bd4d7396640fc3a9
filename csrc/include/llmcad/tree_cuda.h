// CUDA twins of tree.h. Pointers are device pointers; `stream` is a cudaStream_t passed as void* so
// this header needs no CUDA include. All launches are asynchronous on `stream`; the tree is assumed
// valid (the binding layer validates on the host copy of parents). Errors throw std::runtime_error.
#pragma once
#include <cstdint>
#include "llmcad/tree.h"

namespace llmcad {
namespace cuda {

bool available();          // a CUDA device is present and the driver works
int device_count();
bool device_integrated(int device);

void tree_depths(const int32_t* parents, int64_t n, int32_t* depths, void* stream);
void tree_positions(const int32_t* parents, int64_t n, int64_t prefix, int64_t* positions, void* stream);
void tree_mask(const int32_t* parents, int64_t n, int64_t prefix, MaskDType dtype, void* out, void* stream);
void tree_mask_packed(const int32_t* parents, int64_t n, int64_t prefix, uint64_t* out, void* stream);
// paths: [num_leaves, max_depth + 1]; leaves (device, [num_leaves]) lists the leaf node ids in creation order.
void tree_paths(const int32_t* parents, int64_t n, const int32_t* leaves, int64_t num_leaves,
                int32_t max_depth, int32_t* paths, void* stream);
// Single-thread walk on the device; writes accepted[n], *num_accepted and *bonus (device pointers).
void tree_accept(const int32_t* parents, const int32_t* tokens, const int32_t* choice, int64_t n,
                 int32_t* accepted, int64_t* num_accepted, int32_t* bonus, void* stream);
void commit_gather_indices(const int32_t* accepted, const int64_t* num_accepted, int64_t max_accepted,
                           int64_t prefix, int64_t* out, void* stream);

}  // namespace cuda
}  // namespace llmcad
