// What this build holds and what the running machine allows.
#pragma once
#include <string>

namespace llmcad {

bool cuda_compiled();
bool cuda_available();          // a device is present and the driver answers
std::string cuda_architectures();  // e.g. "87;90", empty without CUDA
bool io_uring_compiled();
bool io_uring_available();      // io_uring_queue_init succeeds here (not refused by seccomp/sysctl)

}  // namespace llmcad
