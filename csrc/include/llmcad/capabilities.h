// What this build holds and what the running machine allows.
#pragma once
#include <string>

namespace llmcad {

bool cuda_compiled();
bool cuda_available();          // a device is present and the driver answers
std::string cuda_architectures();  // e.g. "87;90", empty without CUDA
bool io_uring_compiled();
bool io_uring_available();      // io_uring_queue_init succeeds here (not refused by seccomp/sysctl)
// LLMCAD_DISABLE_IO_URING is set (and not "0"): io_uring is treated as refused by the kernel, so
// backend="auto" falls back to pread (simulates kernel.io_uring_disabled / seccomp; tests use it).
bool io_uring_disabled_by_env();

}  // namespace llmcad
