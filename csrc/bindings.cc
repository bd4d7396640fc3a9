// The only pybind11 file: llmcad._C. Thin: converts arguments, checks sizes, releases the GIL around
// blocking calls, and maps C++ exceptions to Python ones (std::invalid_argument -> ValueError).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "llmcad/capabilities.h"
#include "llmcad/tree.h"
#ifdef LLMCAD_WITH_CUDA
#include "llmcad/tree_cuda.h"
#endif

namespace py = pybind11;
using I32Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

namespace {

// ---------------------------------------------------------------- tree (CPU)
int64_t checked_size(const I32Array& a, const char* what) {
  if (a.ndim() != 1) throw std::invalid_argument(std::string(what) + " must be 1-D");
  return a.shape(0);
}

void bind_tree(py::module_& m) {
  m.def("validate_tree", [](const I32Array& parents) {
    llmcad::validate_tree(parents.data(), checked_size(parents, "parents"));
  });
  m.def("tree_depths", [](const I32Array& parents) {
    int64_t n = checked_size(parents, "parents");
    llmcad::validate_tree(parents.data(), n);
    py::array_t<int32_t> out(n);
    llmcad::tree_depths(parents.data(), n, out.mutable_data());
    return out;
  });
  m.def("tree_positions", [](const I32Array& parents, int64_t prefix) {
    int64_t n = checked_size(parents, "parents");
    llmcad::validate_tree(parents.data(), n);
    if (prefix < 0) throw std::invalid_argument("prefix length must be >= 0, got " + std::to_string(prefix));
    py::array_t<int64_t> out(n);
    llmcad::tree_positions(parents.data(), n, prefix, out.mutable_data());
    return out;
  });
  // Writes into a caller's buffer (address + byte size) so any framework's tensor can be filled.
  m.def("tree_mask_into", [](const I32Array& parents, int64_t prefix, int dtype, uintptr_t out, int64_t out_bytes) {
    int64_t n = checked_size(parents, "parents");
    llmcad::validate_tree(parents.data(), n);
    if (prefix < 0) throw std::invalid_argument("prefix length must be >= 0, got " + std::to_string(prefix));
    if (dtype < 0 || dtype > 2) throw std::invalid_argument("mask dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)");
    int64_t elem = dtype == 0 ? 4 : 2;
    if (out_bytes != n * (prefix + n) * elem)
      throw std::invalid_argument("mask buffer has " + std::to_string(out_bytes) + " bytes, needs " +
                                  std::to_string(n * (prefix + n) * elem));
    llmcad::tree_mask(parents.data(), n, prefix, static_cast<llmcad::MaskDType>(dtype), reinterpret_cast<void*>(out));
  });
  m.def("tree_mask_packed", [](const I32Array& parents, int64_t prefix) {
    int64_t n = checked_size(parents, "parents");
    llmcad::validate_tree(parents.data(), n);
    if (prefix < 0) throw std::invalid_argument("prefix length must be >= 0, got " + std::to_string(prefix));
    py::array_t<uint64_t> out({n, llmcad::packed_mask_words(n, prefix)});
    llmcad::tree_mask_packed(parents.data(), n, prefix, out.mutable_data());
    return out;
  });
  m.def("tree_paths", [](const I32Array& parents) {
    int64_t n = checked_size(parents, "parents");
    llmcad::validate_tree(parents.data(), n);
    int64_t leaves = llmcad::tree_num_leaves(parents.data(), n);
    int64_t width = llmcad::tree_max_depth(parents.data(), n) + 1;
    py::array_t<int32_t> out({leaves, width});
    llmcad::tree_paths(parents.data(), n, out.mutable_data());
    return out;
  });
  m.def("tree_accept", [](const I32Array& parents, const I32Array& tokens, const I32Array& choice) {
    int64_t n = checked_size(parents, "parents");
    if (checked_size(tokens, "tokens") != n || checked_size(choice, "choice") != n)
      throw std::invalid_argument("parents, tokens and choice must have the same length");
    llmcad::validate_tree(parents.data(), n);
    py::array_t<int32_t> accepted(n);
    int32_t bonus = -1;
    int64_t count = llmcad::tree_accept(parents.data(), tokens.data(), choice.data(), n,
                                        accepted.mutable_data(), &bonus);
    accepted.resize({count});
    return py::make_tuple(accepted, bonus);
  });
  m.def("commit_gather_indices", [](const I32Array& accepted, int64_t prefix) {
    int64_t count = checked_size(accepted, "accepted");
    if (prefix < 0) throw std::invalid_argument("prefix length must be >= 0, got " + std::to_string(prefix));
    py::array_t<int64_t> out(prefix + count);
    llmcad::commit_gather_indices(accepted.data(), count, prefix, out.mutable_data());
    return out;
  });
}

// ---------------------------------------------------------------- tree (CUDA)
// Device pointers and the stream cross as integers; the Python layer validates shapes and dtypes.
void bind_tree_cuda(py::module_& m) {
#ifdef LLMCAD_WITH_CUDA
  using llmcad::MaskDType;
  auto p = [](uintptr_t v) { return reinterpret_cast<void*>(v); };
  m.def("cuda_tree_depths", [p](uintptr_t parents, int64_t n, uintptr_t out, uintptr_t stream) {
    llmcad::cuda::tree_depths(static_cast<const int32_t*>(p(parents)), n, static_cast<int32_t*>(p(out)), p(stream));
  });
  m.def("cuda_tree_positions", [p](uintptr_t parents, int64_t n, int64_t prefix, uintptr_t out, uintptr_t stream) {
    llmcad::cuda::tree_positions(static_cast<const int32_t*>(p(parents)), n, prefix, static_cast<int64_t*>(p(out)), p(stream));
  });
  m.def("cuda_tree_mask", [p](uintptr_t parents, int64_t n, int64_t prefix, int dtype, uintptr_t out, uintptr_t stream) {
    llmcad::cuda::tree_mask(static_cast<const int32_t*>(p(parents)), n, prefix, static_cast<MaskDType>(dtype), p(out), p(stream));
  });
  m.def("cuda_tree_mask_packed", [p](uintptr_t parents, int64_t n, int64_t prefix, uintptr_t out, uintptr_t stream) {
    llmcad::cuda::tree_mask_packed(static_cast<const int32_t*>(p(parents)), n, prefix, static_cast<uint64_t*>(p(out)), p(stream));
  });
  m.def("cuda_tree_paths", [p](uintptr_t parents, int64_t n, uintptr_t leaves, int64_t num_leaves, int32_t max_depth,
                               uintptr_t out, uintptr_t stream) {
    llmcad::cuda::tree_paths(static_cast<const int32_t*>(p(parents)), n, static_cast<const int32_t*>(p(leaves)),
                             num_leaves, max_depth, static_cast<int32_t*>(p(out)), p(stream));
  });
  m.def("cuda_tree_accept", [p](uintptr_t parents, uintptr_t tokens, uintptr_t choice, int64_t n, uintptr_t accepted,
                                uintptr_t num_accepted, uintptr_t bonus, uintptr_t stream) {
    llmcad::cuda::tree_accept(static_cast<const int32_t*>(p(parents)), static_cast<const int32_t*>(p(tokens)),
                              static_cast<const int32_t*>(p(choice)), n, static_cast<int32_t*>(p(accepted)),
                              static_cast<int64_t*>(p(num_accepted)), static_cast<int32_t*>(p(bonus)), p(stream));
  });
  m.def("cuda_commit_gather_indices", [p](uintptr_t accepted, uintptr_t num_accepted, int64_t max_accepted,
                                          int64_t prefix, uintptr_t out, uintptr_t stream) {
    llmcad::cuda::commit_gather_indices(static_cast<const int32_t*>(p(accepted)), static_cast<const int64_t*>(p(num_accepted)),
                                        max_accepted, prefix, static_cast<int64_t*>(p(out)), p(stream));
  });
#else
  (void)m;
#endif
}

// ---------------------------------------------------------------- streamer
void bind_streamer(py::module_& m) {
  (void)m;  // filled in by the streamer (issue 4)
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "llmcad compiled core: token-tree planning kernels and the weight streamer";
  m.def("cuda_compiled", &llmcad::cuda_compiled);
  m.def("cuda_available", &llmcad::cuda_available);
  m.def("cuda_architectures", &llmcad::cuda_architectures);
  m.def("io_uring_compiled", &llmcad::io_uring_compiled);
  m.def("io_uring_available", &llmcad::io_uring_available);
  bind_tree(m);
  bind_tree_cuda(m);
  bind_streamer(m);
}
