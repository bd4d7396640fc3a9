// CUDA twins of tree.h. Pointers are device pointers on CUDA device `device`, which each call makes
// current for itself (and restores after): the extension links its own CUDA runtime, whose current
// device is not torch's. `stream` is a cudaStream_t passed as void* (0: the legacy default stream) so
// this header needs no CUDA include. Launches are asynchronous on `stream`; the tree is assumed valid
// (the binding layer validates sizes and pointers, Python the parent array on the host). Errors throw
// std::runtime_error; with LLMCAD_CUDA_DEBUG each launch is also synchronized and checked.
#pragma once
#include <cstdint>
#include "llmcad/tree.h"

namespace llmcad {
namespace cuda {

bool available();  // a CUDA device is present and the driver works
int device_count();
bool device_integrated(int device);
bool debug_checks();  // compiled with LLMCAD_CUDA_DEBUG

// Throws std::invalid_argument naming `what` unless `ptr` is memory that device `device` can read and
// write at that address (device, managed or mapped host memory).
void check_device_pointer(int device, const void* ptr, const char* what);

void tree_depths(int device, const int32_t* parents, int64_t n, int32_t* depths, void* stream);
void tree_positions(int device, const int32_t* parents, int64_t n, int64_t prefix, int64_t* positions,
                    void* stream);
void tree_mask(int device, const int32_t* parents, int64_t n, int64_t prefix, MaskDType dtype, void* out,
               void* stream);

// The acceptance walk (one thread) writes an accept record, int32 [n + 2]:
// {count, bonus, accepted[0], ..., accepted[count - 1], unspecified...}, so one copy of
// record[0 : count + 2] brings everything to the host.
constexpr int64_t kAcceptRecordHeader = 2;
void tree_accept(int device, const int32_t* parents, const int32_t* tokens, const int32_t* choice, int64_t n,
                 int32_t* record, void* stream);
// KV slots kept by a commit, from an accept record: out[prefix + count] = [0, prefix) then
// prefix + accepted[j]; `count` is the record's count, already known to the caller.
void commit_gather_indices(int device, const int32_t* record, int64_t count, int64_t prefix, int64_t* out,
                           void* stream);

}  // namespace cuda
}  // namespace llmcad
