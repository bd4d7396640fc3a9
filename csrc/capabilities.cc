#include "llmcad/capabilities.h"

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

bool io_uring_available() {
#ifdef LLMCAD_WITH_URING
  struct io_uring ring;
  if (io_uring_queue_init(2, &ring, 0) < 0) return false;  // -EPERM / -ENOSYS when refused
  io_uring_queue_exit(&ring);
  return true;
#else
  return false;
#endif
}

}  // namespace llmcad
