// The only pybind11 file: llmcad._C. Thin: converts arguments, checks sizes, releases the GIL around
// blocking calls, and maps C++ exceptions to Python ones (std::invalid_argument -> ValueError).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "llmcad/capabilities.h"
#include "llmcad/tree.h"
#include "llmcad/streamer.h"
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
  // cudaDeviceProp.integrated: the GPU shares host memory (Jetson), so pinned buffers are used in place.
  m.def("cuda_device_integrated", [](int device) {
    if (device < 0 || device >= llmcad::cuda::device_count())
      throw std::invalid_argument("no CUDA device " + std::to_string(device));
    return llmcad::cuda::device_integrated(device);
  });
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
  using llmcad::Streamer;
  // StreamerIOError(errno, message): an OSError subclass; llmcad.streamer re-raises llmcad.errors'.
  static py::handle io_error = py::exception<llmcad::StreamerIOError>(m, "StreamerIOError", PyExc_OSError).release();
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const llmcad::StreamerIOError& e) {
      PyErr_SetObject(io_error.ptr(), py::make_tuple(e.code(), e.what()).ptr());
    }
  });
  auto to_ranges = [](const std::vector<std::tuple<int64_t, int64_t, int64_t>>& in) {
    std::vector<llmcad::ByteRange> out;
    for (size_t i = 0; i < in.size(); ++i) {
      auto [file, offset, length] = in[i];
      if (file < 0 || offset < 0 || length < 0)
        throw std::invalid_argument("range " + std::to_string(i) + " (file, offset, length) has a negative value");
      out.push_back({static_cast<int32_t>(file), static_cast<uint64_t>(offset), static_cast<uint64_t>(length)});
    }
    return out;
  };
  auto parse_backend = [](const std::string& b) {
    if (b == "auto") return llmcad::StreamerBackend::kAuto;
    if (b == "io_uring") return llmcad::StreamerBackend::kIoUring;
    if (b == "pread") return llmcad::StreamerBackend::kPread;
    throw std::invalid_argument("backend must be 'auto', 'io_uring' or 'pread', got '" + b + "'");
  };
  auto parse_pinned = [](const std::string& p) {
    if (p == "auto") return llmcad::PinMode::kAuto;
    if (p == "on") return llmcad::PinMode::kOn;
    if (p == "off") return llmcad::PinMode::kOff;
    throw std::invalid_argument("pinned must be 'auto', 'on' or 'off', got '" + p + "'");
  };
  py::class_<Streamer>(m, "Streamer")
      .def(py::init([=](std::vector<std::string> paths, int64_t buffer_bytes, int num_buffers, const std::string& backend,
                        bool direct, int queue_depth, int64_t chunk_bytes, double bandwidth_cap, const std::string& pinned) {
             if (buffer_bytes <= 0) throw std::invalid_argument("buffer_bytes must be > 0");
             if (chunk_bytes <= 0) throw std::invalid_argument("chunk_bytes must be > 0");
             llmcad::StreamerOptions o;
             o.paths = std::move(paths);
             o.buffer_bytes = static_cast<uint64_t>(buffer_bytes);
             o.num_buffers = num_buffers;
             o.backend = parse_backend(backend);
             o.direct = direct;
             o.queue_depth = queue_depth;
             o.chunk_bytes = static_cast<uint64_t>(chunk_bytes);
             o.bandwidth_cap = bandwidth_cap;
             o.pinned = parse_pinned(pinned);
             py::gil_scoped_release release;  // opening files and faulting buffers in can take a while
             return std::make_unique<Streamer>(std::move(o));
           }),
           py::arg("paths"), py::arg("buffer_bytes"), py::arg("num_buffers"), py::arg("backend"), py::arg("direct"),
           py::arg("queue_depth"), py::arg("chunk_bytes"), py::arg("bandwidth_cap"), py::arg("pinned"))
      .def("add_layer", [=](Streamer& s, const std::vector<std::tuple<int64_t, int64_t, int64_t>>& ranges) {
        return s.add_layer(to_ranges(ranges));
      })
      .def("prefetch", &Streamer::prefetch)
      // Returns (array over the layer's bytes, offsets, lengths, buffer address, device address or 0
      // when not pinned). The array keeps the buffer memory alive; its contents are valid until release().
      .def("acquire", [](Streamer& s, int layer) {
        llmcad::LayerView v;
        {
          py::gil_scoped_release release;
          v = s.acquire(layer);
        }
        auto* owner = new std::shared_ptr<void>(v.owner);
        py::capsule keep(owner, [](void* p) { delete static_cast<std::shared_ptr<void>*>(p); });
        py::array_t<uint8_t> array({static_cast<py::ssize_t>(v.size)}, {static_cast<py::ssize_t>(1)}, v.data, keep);
        return py::make_tuple(array, v.offsets, v.lengths, reinterpret_cast<uintptr_t>(v.data),
                              reinterpret_cast<uintptr_t>(v.device_data));
      })
      .def("release", &Streamer::release)
      .def("reset", &Streamer::reset, py::call_guard<py::gil_scoped_release>())
      .def("close", &Streamer::close, py::call_guard<py::gil_scoped_release>())
      .def("inject_fault", [](Streamer& s, int64_t index, int code) {
        if (index < 0) throw std::invalid_argument("read_index must be >= 0");
        s.inject_fault(static_cast<uint64_t>(index), code);
      })
      .def("next_ready", &Streamer::next_ready)
      // [(seq, layer, start_s, end_s, bytes, ok)] of the loads with seq >= since (streamer_clock_s time)
      .def("loads_since", [](const Streamer& s, int64_t since) {
        if (since < 0) throw std::invalid_argument("since must be >= 0");
        std::vector<std::tuple<uint64_t, int, double, double, uint64_t, bool>> out;
        for (const llmcad::LoadRecord& r : s.loads_since(static_cast<uint64_t>(since)))
          out.emplace_back(r.seq, r.layer, r.start_s, r.end_s, r.bytes, r.ok);
        return out;
      })
      .def("loads_finished", &Streamer::loads_finished)
      .def("num_layers", &Streamer::num_layers)
      .def("layer_bytes", &Streamer::layer_bytes)
      .def("layout_bytes", &Streamer::layout_bytes)
      .def("stats", [](const Streamer& s) {
        llmcad::StreamerStats st = s.stats();
        py::dict d;
        d["backend"] = st.backend;
        d["direct"] = st.direct;
        d["pinned"] = st.pinned;
        d["registered"] = st.registered;
        d["num_buffers"] = st.num_buffers;
        d["buffer_bytes"] = st.buffer_bytes;
        d["memory_bytes"] = st.memory_bytes;
        d["bytes_read"] = st.bytes_read;
        d["reads"] = st.reads;
        d["layers_loaded"] = st.layers_loaded;
        d["errors"] = st.errors;
        d["acquire_wait_s"] = st.acquire_wait_s;
        d["io_busy_s"] = st.io_busy_s;
        d["warnings"] = st.warnings;
        return d;
      });
  m.def("streamer_layout_bytes", [=](const std::vector<std::tuple<int64_t, int64_t, int64_t>>& ranges) {
    return llmcad::streamer_layout_bytes(to_ranges(ranges));
  });
  m.def("streamer_clock_s", &llmcad::streamer_clock_s);
  m.def("evict_from_page_cache", &llmcad::evict_from_page_cache, py::call_guard<py::gil_scoped_release>());
  m.def("raw_direct_read_bytes_per_s", &llmcad::raw_direct_read_bytes_per_s, py::arg("path"),
        py::arg("block_bytes") = 4 << 20, py::call_guard<py::gil_scoped_release>());
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
