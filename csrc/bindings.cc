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
// Device buffers cross as (address, byte size) integers with the device index and the stream handle
// (0: the default stream). Everything checkable on the host is checked here, without touching device
// memory: the device index, each size against n (from the parents' size), and that each address is
// memory of that device. The parent array itself is validated in Python, on the host copy it came from.
#ifdef LLMCAD_WITH_CUDA
int checked_device(int device) {
  int count = llmcad::cuda::device_count();
  if (device < 0 || device >= count)
    throw std::invalid_argument("no CUDA device " + std::to_string(device) + " (" + std::to_string(count) +
                                " present)");
  return device;
}

template <typename T>
T* device_buffer(int device, uintptr_t address, int64_t bytes, int64_t expected_bytes, const std::string& what) {
  if (bytes != expected_bytes)
    throw std::invalid_argument(what + " has " + std::to_string(bytes) + " bytes, needs " +
                                std::to_string(expected_bytes));
  auto* ptr = reinterpret_cast<T*>(address);
  llmcad::cuda::check_device_pointer(device, ptr, what.c_str());
  return ptr;
}

// n from the parents buffer (int32 [n], n >= 1).
int64_t parents_count(int64_t parents_bytes) {
  if (parents_bytes <= 0 || parents_bytes % 4)
    throw std::invalid_argument("parents buffer has " + std::to_string(parents_bytes) +
                                " bytes, needs a positive multiple of 4 (int32 [n], n >= 1)");
  return parents_bytes / 4;
}

void check_prefix(int64_t prefix) {
  if (prefix < 0) throw std::invalid_argument("prefix length must be >= 0, got " + std::to_string(prefix));
}
#endif

void bind_tree_cuda(py::module_& m) {
#ifdef LLMCAD_WITH_CUDA
  using llmcad::MaskDType;
  auto stream_of = [](uintptr_t stream) { return reinterpret_cast<void*>(stream); };
  m.def("cuda_device_count", &llmcad::cuda::device_count);
  m.def("cuda_debug_checks", &llmcad::cuda::debug_checks);
  // cudaDeviceProp.integrated: the GPU shares host memory (Jetson), so pinned buffers are used in place.
  m.def("cuda_device_integrated", [](int device) { return llmcad::cuda::device_integrated(checked_device(device)); });
  m.def("cuda_tree_depths", [=](int device, uintptr_t parents, int64_t parents_bytes, uintptr_t out, int64_t out_bytes,
                                uintptr_t stream) {
    checked_device(device);
    int64_t n = parents_count(parents_bytes);
    auto* p = device_buffer<const int32_t>(device, parents, parents_bytes, 4 * n, "parents");
    auto* o = device_buffer<int32_t>(device, out, out_bytes, 4 * n, "depths output (int32 [n])");
    llmcad::cuda::tree_depths(device, p, n, o, stream_of(stream));
  }, py::arg("device"), py::arg("parents"), py::arg("parents_bytes"), py::arg("out"), py::arg("out_bytes"),
     py::arg("stream"));
  m.def("cuda_tree_positions", [=](int device, uintptr_t parents, int64_t parents_bytes, int64_t prefix, uintptr_t out,
                                   int64_t out_bytes, uintptr_t stream) {
    checked_device(device);
    check_prefix(prefix);
    int64_t n = parents_count(parents_bytes);
    auto* p = device_buffer<const int32_t>(device, parents, parents_bytes, 4 * n, "parents");
    auto* o = device_buffer<int64_t>(device, out, out_bytes, 8 * n, "positions output (int64 [n])");
    llmcad::cuda::tree_positions(device, p, n, prefix, o, stream_of(stream));
  }, py::arg("device"), py::arg("parents"), py::arg("parents_bytes"), py::arg("prefix"), py::arg("out"),
     py::arg("out_bytes"), py::arg("stream"));
  m.def("cuda_tree_mask", [=](int device, uintptr_t parents, int64_t parents_bytes, int64_t prefix, int dtype,
                              uintptr_t out, int64_t out_bytes, uintptr_t stream) {
    checked_device(device);
    check_prefix(prefix);
    if (dtype < 0 || dtype > 2) throw std::invalid_argument("mask dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)");
    int64_t n = parents_count(parents_bytes);
    auto* p = device_buffer<const int32_t>(device, parents, parents_bytes, 4 * n, "parents");
    int64_t elem = dtype == 0 ? 4 : 2;
    auto* o = device_buffer<void>(device, out, out_bytes, n * (prefix + n) * elem, "mask output ([n, prefix + n])");
    llmcad::cuda::tree_mask(device, p, n, prefix, static_cast<MaskDType>(dtype), o, stream_of(stream));
  }, py::arg("device"), py::arg("parents"), py::arg("parents_bytes"), py::arg("prefix"), py::arg("dtype"),
     py::arg("out"), py::arg("out_bytes"), py::arg("stream"));
  m.def("cuda_tree_accept", [=](int device, uintptr_t parents, int64_t parents_bytes, uintptr_t tokens,
                                int64_t tokens_bytes, uintptr_t choice, int64_t choice_bytes, uintptr_t record,
                                int64_t record_bytes, uintptr_t stream) {
    checked_device(device);
    int64_t n = parents_count(parents_bytes);
    auto* p = device_buffer<const int32_t>(device, parents, parents_bytes, 4 * n, "parents");
    auto* t = device_buffer<const int32_t>(device, tokens, tokens_bytes, 4 * n, "tokens (int32 [n])");
    auto* c = device_buffer<const int32_t>(device, choice, choice_bytes, 4 * n, "choice (int32 [n])");
    auto* r = device_buffer<int32_t>(device, record, record_bytes, 4 * (n + llmcad::cuda::kAcceptRecordHeader),
                                     "accept record (int32 [n + 2])");
    llmcad::cuda::tree_accept(device, p, t, c, n, r, stream_of(stream));
  }, py::arg("device"), py::arg("parents"), py::arg("parents_bytes"), py::arg("tokens"), py::arg("tokens_bytes"),
     py::arg("choice"), py::arg("choice_bytes"), py::arg("record"), py::arg("record_bytes"), py::arg("stream"));
  m.def("cuda_commit_gather_indices", [=](int device, uintptr_t record, int64_t record_bytes, int64_t count,
                                          int64_t prefix, uintptr_t out, int64_t out_bytes, uintptr_t stream) {
    checked_device(device);
    check_prefix(prefix);
    if (record_bytes <= 4 * llmcad::cuda::kAcceptRecordHeader || record_bytes % 4)
      throw std::invalid_argument("accept record has " + std::to_string(record_bytes) +
                                  " bytes, needs int32 [n + 2] with n >= 1");
    int64_t n = record_bytes / 4 - llmcad::cuda::kAcceptRecordHeader;
    if (count < 1 || count > n)
      throw std::invalid_argument("accepted count " + std::to_string(count) + " outside [1, " + std::to_string(n) +
                                  "] for an accept record of " + std::to_string(n) + " nodes");
    auto* r = device_buffer<const int32_t>(device, record, record_bytes, record_bytes, "accept record");
    auto* o = device_buffer<int64_t>(device, out, out_bytes, 8 * (prefix + count),
                                     "commit indices output (int64 [prefix + count])");
    llmcad::cuda::commit_gather_indices(device, r, count, prefix, o, stream_of(stream));
  }, py::arg("device"), py::arg("record"), py::arg("record_bytes"), py::arg("count"), py::arg("prefix"),
     py::arg("out"), py::arg("out_bytes"), py::arg("stream"));
#else
  (void)m;
#endif
}

// ---------------------------------------------------------------- streamer
// Between slices of a blocking wait (GIL released): run Python's signal handlers. True when one
// raised (e.g. KeyboardInterrupt); the error stays set on this thread for the caller to raise.
bool python_signal_raised() {
  py::gil_scoped_acquire gil;
  return PyErr_CheckSignals() != 0;
}

// Runs `wait` with the GIL released; a StreamerInterrupted becomes the exception a signal handler
// raised, or KeyboardInterrupt when interrupt() woke the wait (another thread was interrupted).
template <typename F>
auto interruptible(F&& wait) {
  try {
    py::gil_scoped_release release;
    return wait();
  } catch (const llmcad::StreamerInterrupted& e) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_KeyboardInterrupt, e.what());
    throw py::error_already_set();
  }
}

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
        llmcad::LayerView v = interruptible([&] { return s.acquire(layer, python_signal_raised); });
        auto* owner = new std::shared_ptr<void>(v.owner);
        py::capsule keep(owner, [](void* p) { delete static_cast<std::shared_ptr<void>*>(p); });
        py::array_t<uint8_t> array({static_cast<py::ssize_t>(v.size)}, {static_cast<py::ssize_t>(1)}, v.data, keep);
        return py::make_tuple(array, v.offsets, v.lengths, reinterpret_cast<uintptr_t>(v.data),
                              reinterpret_cast<uintptr_t>(v.device_data));
      })
      .def("release", &Streamer::release)
      .def("reset", [](Streamer& s) { interruptible([&] { s.reset(python_signal_raised); }); })
      .def("interrupt", &Streamer::interrupt)
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
      // [(dev, ino, size, mtime_ns, ctime_ns, nlink)] of the descriptors the streamer reads
      .def("file_identities", [](const Streamer& s) {
        std::vector<std::tuple<uint64_t, uint64_t, uint64_t, int64_t, int64_t, uint64_t>> out;
        for (const llmcad::FileIdentity& f : s.file_identities())
          out.emplace_back(f.dev, f.ino, f.size, f.mtime_ns, f.ctime_ns, f.nlink);
        return out;
      })
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
  m.attr("STREAMER_ALIGNMENT") = llmcad::kStreamerAlign;
  m.def("streamer_buffer_capacity", [](int64_t buffer_bytes, int64_t num_files) {
    if (buffer_bytes < 0 || num_files < 0) throw std::invalid_argument("buffer_bytes and num_files must be >= 0");
    return llmcad::streamer_buffer_capacity(static_cast<uint64_t>(buffer_bytes), static_cast<size_t>(num_files));
  });
  m.def("streamer_buffer_bytes_for", [=](const std::vector<std::tuple<int64_t, int64_t, int64_t>>& ranges, int64_t num_files) {
    if (num_files < 0) throw std::invalid_argument("num_files must be >= 0");
    return llmcad::streamer_buffer_bytes_for(to_ranges(ranges), static_cast<size_t>(num_files));
  });
  m.def("streamer_memory_bytes", [](int64_t buffer_bytes, int num_buffers, int64_t num_files) {
    if (buffer_bytes < 0 || num_buffers < 0 || num_files < 0)
      throw std::invalid_argument("buffer_bytes, num_buffers and num_files must be >= 0");
    return llmcad::streamer_memory_bytes(static_cast<uint64_t>(buffer_bytes), num_buffers, static_cast<size_t>(num_files));
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
