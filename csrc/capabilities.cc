#include "llmcad/capabilities.h"

#include <cstdlib>
#include <cstring>

#ifdef LLMCAD_WITH_CUDA
#include "llmcad/tree_cuda.h"
#endif
#ifdef LLMCAD_WITH_URING
#include <liburing.h>
#endif

namespace llmcad {

bool cuda_compiled() {
#ifdef LLMCAD_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool cuda_available() {
#ifdef LLMCAD_WITH_CUDA
  return cuda::available();
#else
  return false;
#endif
}

std::string cuda_architectures() {
#ifdef LLMCAD_CUDA_ARCHS
  return LLMCAD_CUDA_ARCHS;
#else
  return "";
#endif
}

bool io_uring_compiled() {
#ifdef LLMCAD_WITH_URING
  return true;
#else
  return false;
#endif
}

bool io_uring_disabled_by_env() {
  const char* v = std::getenv("LLMCAD_DISABLE_IO_URING");
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

bool io_uring_available() {
#ifdef LLMCAD_WITH_URING
  if (io_uring_disabled_by_env()) return false;
  struct io_uring ring;
  if (io_uring_queue_init(2, &ring, 0) < 0) return false;  // -EPERM / -ENOSYS when refused
  io_uring_queue_exit(&ring);
  return true;
#else
  return false;
#endif
}

}  // namespace llmcad
