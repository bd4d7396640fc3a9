// C++ unit tests of streamer.h: layout, byte-exact layers per backend, ordering misuse, faults.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "llmcad/capabilities.h"
#include "llmcad/streamer.h"

using llmcad::ByteRange;
using llmcad::Streamer;
using llmcad::StreamerBackend;
using llmcad::StreamerIOError;
using llmcad::StreamerOptions;

namespace {

// A random-bytes file in a fresh temporary directory; removed at the end of the test.
struct TempFile {
  std::string dir, path;
  std::vector<uint8_t> bytes;
  explicit TempFile(size_t size, unsigned seed = 1) {
    const char* base = std::getenv("TMPDIR");
    std::string templ = std::string(base ? base : "/tmp") + "/llmcad_streamer_XXXXXX";
    std::vector<char> buf(templ.begin(), templ.end());
    buf.push_back('\0');
    dir = mkdtemp(buf.data());
    path = dir + "/w.bin";
    std::mt19937 rng(seed);
    bytes.resize(size);
    for (auto& b : bytes) b = static_cast<uint8_t>(rng());
    FILE* f = std::fopen(path.c_str(), "wb");
    std::fwrite(bytes.data(), 1, bytes.size(), f);
    std::fclose(f);
  }
  ~TempFile() {
    std::remove(path.c_str());
    rmdir(dir.c_str());
  }
};

std::vector<StreamerBackend> backends() {
  std::vector<StreamerBackend> out{StreamerBackend::kPread};
  if (llmcad::io_uring_available()) out.push_back(StreamerBackend::kIoUring);
  return out;
}

StreamerOptions options(const std::string& path, StreamerBackend backend, bool direct, int buffers) {
  StreamerOptions o;
  o.paths = {path};
  o.buffer_bytes = 1 << 18;
  o.num_buffers = buffers;
  o.backend = backend;
  o.direct = direct;
  o.queue_depth = 4;
  o.chunk_bytes = 8192;
  o.pinned = llmcad::PinMode::kOff;
  return o;
}

bool same(const llmcad::LayerView& v, size_t i, const std::vector<uint8_t>& file, const ByteRange& r) {
  return std::memcmp(v.data + v.offsets[i], file.data() + r.offset, r.length) == 0 && v.lengths[i] == r.length;
}

const std::vector<std::vector<ByteRange>> kLayers = {
    {{0, 1, 4095}, {0, 4096, 4097}, {0, 8193, 12345}},
    {{0, 100003, 70000}},
    {{0, 199000, 1001}},  // ends at end of file
    {{0, 5, 0}, {0, 123457, 33333}},
};

}  // namespace

TEST(StreamerLayout, AlignedExtents) {
  EXPECT_EQ(llmcad::streamer_layout_bytes({{0, 1, 10}}), 4096u);
  EXPECT_EQ(llmcad::streamer_layout_bytes({{0, 4095, 2}}), 8192u);
  EXPECT_EQ(llmcad::streamer_layout_bytes({{0, 0, 4096}, {0, 4096, 1}}), 8192u);  // adjacent: one extent
  EXPECT_EQ(llmcad::streamer_layout_bytes({{0, 0, 1}, {1, 0, 1}}), 8192u);        // two files
  EXPECT_EQ(llmcad::streamer_layout_bytes({{0, 0, 0}}), 0u);
}

TEST(StreamerLayout, BufferSizes) {
  // capacity: payload + two aligned blocks per file, rounded up to 4096
  EXPECT_EQ(llmcad::streamer_buffer_capacity(1, 1), 3 * 4096u);
  EXPECT_EQ(llmcad::streamer_buffer_capacity(4096, 2), 5 * 4096u);
  EXPECT_EQ(llmcad::streamer_memory_bytes(1, 2, 1), 6 * 4096u);
  const std::vector<std::vector<ByteRange>> layers = {
      {{0, 1, 4095}, {0, 4096, 4097}, {1, 100, 10}}, {{0, 4095, 2}}, {{0, 0, 100000}}, {{0, 5, 0}}};
  for (const auto& ranges : layers) {
    uint64_t payload = 0;
    for (const ByteRange& r : ranges) payload += r.length;
    uint64_t need = llmcad::streamer_buffer_bytes_for(ranges, 2);
    EXPECT_GE(need, payload);
    EXPECT_GE(llmcad::streamer_buffer_capacity(need, 2), llmcad::streamer_layout_bytes(ranges));
  }
}

TEST(Streamer, LayersAreByteIdenticalForEveryBackend) {
  TempFile file(200001);
  for (StreamerBackend backend : backends())
    for (bool direct : {true, false})
      for (int buffers : {1, 2, 4}) {
        Streamer s(options(file.path, backend, direct, buffers));
        EXPECT_EQ(s.stats().direct, direct);
        std::vector<int> ids;
        for (const auto& l : kLayers) ids.push_back(s.add_layer(l));
        for (int round = 0; round < 2; ++round) {
          for (int id : ids) s.prefetch(id);
          for (int id : ids) {
            llmcad::LayerView v = s.acquire(id);
            for (size_t i = 0; i < kLayers[id].size(); ++i)
              EXPECT_TRUE(same(v, i, file.bytes, kLayers[id][i])) << "layer " << id << " range " << i;
            s.release(id);
          }
        }
        EXPECT_EQ(s.stats().layers_loaded, 2 * kLayers.size());
      }
}

TEST(Streamer, MisuseThrowsInvalidArgument) {
  TempFile file(50000);
  Streamer s(options(file.path, StreamerBackend::kPread, true, 1));
  int a = s.add_layer({{0, 0, 100}}), b = s.add_layer({{0, 100, 100}});
  s.prefetch(a);
  s.prefetch(b);
  EXPECT_THROW(s.acquire(b), std::invalid_argument);  // out of order
  s.acquire(a);
  EXPECT_THROW(s.acquire(b), std::invalid_argument);  // the only buffer is held
  s.release(a);
  EXPECT_THROW(s.release(a), std::invalid_argument);  // double release
  EXPECT_THROW(s.prefetch(9), std::invalid_argument);
  EXPECT_THROW(s.add_layer({{3, 0, 1}}), std::invalid_argument);
  EXPECT_THROW(s.add_layer({{0, 0, 1 << 20}}), std::invalid_argument);  // larger than a buffer
  s.close();
  EXPECT_THROW(s.acquire(a), std::invalid_argument);
}

TEST(Streamer, InjectedFaultThenCleanRead) {
  TempFile file(100000);
  for (StreamerBackend backend : backends()) {
    Streamer s(options(file.path, backend, true, 2));
    int id = s.add_layer({{0, 10, 90000}});
    s.inject_fault(2, EIO);
    int code = 0;
    std::string message;
    try {
      s.acquire(id);
    } catch (const StreamerIOError& e) {
      code = e.code();
      message = e.what();
    }
    EXPECT_EQ(code, EIO);
    EXPECT_NE(message.find(file.path), std::string::npos) << message;
    EXPECT_NE(message.find(std::strerror(EIO)), std::string::npos) << message;
    llmcad::LayerView v = s.acquire(id);
    EXPECT_TRUE(same(v, 0, file.bytes, {0, 10, 90000}));
  }
}

TEST(Streamer, LoadRecordsAndReadiness) {
  TempFile file(200000);
  for (StreamerBackend backend : backends()) {
    Streamer s(options(file.path, backend, true, 2));
    int a = s.add_layer(kLayers[0]), b = s.add_layer(kLayers[1]);
    EXPECT_FALSE(s.next_ready());  // nothing queued
    double t0 = llmcad::streamer_clock_s();
    s.prefetch(a);
    s.acquire(a);
    EXPECT_FALSE(s.next_ready());
    s.inject_fault(0, EIO);  // fails b's first read
    s.prefetch(b);
    while (!s.next_ready()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    EXPECT_THROW(s.acquire(b), StreamerIOError);
    s.release(a);
    double t1 = llmcad::streamer_clock_s();
    std::vector<llmcad::LoadRecord> loads = s.loads_since(0);
    ASSERT_EQ(loads.size(), 2u);
    EXPECT_EQ(loads[0].seq, 0u);
    EXPECT_EQ(loads[0].layer, a);
    EXPECT_TRUE(loads[0].ok);
    EXPECT_EQ(loads[0].bytes, s.layer_bytes(a));
    EXPECT_EQ(loads[1].layer, b);
    EXPECT_FALSE(loads[1].ok);
    // The IO thread's times may read up to a fraction of a millisecond off this thread's on a VM whose
    // vCPUs' TSCs disagree; kClockSkewS is well above that and far below any other clock's offset.
    constexpr double kClockSkewS = 0.005;
    for (const llmcad::LoadRecord& r : loads) {
      EXPECT_LE(t0 - kClockSkewS, r.start_s);
      EXPECT_LE(r.start_s, r.end_s + kClockSkewS);
      EXPECT_LE(r.end_s, t1 + kClockSkewS);
    }
    EXPECT_EQ(s.loads_finished(), 2u);
    EXPECT_EQ(s.loads_since(1).size(), 1u);
  }
}

TEST(Streamer, TruncatedFileIsAnErrorAtAcquire) {
  TempFile file(100000);
  for (StreamerBackend backend : backends()) {
    Streamer s(options(file.path, backend, true, 2));
    int id = s.add_layer({{0, 50000, 50000}});
    ASSERT_EQ(truncate(file.path.c_str(), 60000), 0);
    EXPECT_THROW(s.acquire(id), StreamerIOError);
    ASSERT_EQ(truncate(file.path.c_str(), 100000), 0);  // zeros now, but present again
    EXPECT_NO_THROW(s.acquire(id));
  }
}

TEST(Streamer, MissingFileThrowsAtConstruction) {
  StreamerOptions o = options("/nonexistent/llmcad/weights.bin", StreamerBackend::kPread, true, 1);
  int code = 0;
  try {
    Streamer s(o);
  } catch (const StreamerIOError& e) {
    code = e.code();
    EXPECT_NE(std::string(e.what()).find("/nonexistent/llmcad/weights.bin"), std::string::npos);
  }
  EXPECT_EQ(code, ENOENT);
}

TEST(Streamer, DestructionWithLayersHeldAndQueuedDoesNotHang) {
  TempFile file(200001);
  for (StreamerBackend backend : backends()) {
    StreamerOptions o = options(file.path, backend, true, 2);
    o.bandwidth_cap = 5e6;  // keep reads in flight when the streamer goes away
    Streamer s(o);
    std::vector<int> ids;
    for (const auto& l : kLayers) ids.push_back(s.add_layer(l));
    for (int id : ids) s.prefetch(id);
    llmcad::LayerView held = s.acquire(ids[0]);
    s.reset();
    EXPECT_NO_THROW(s.acquire(ids[1]));  // after reset any layer may come first
    for (int id : ids) s.prefetch(id);
  }  // ~Streamer with a held layer and queued reads
}

// Storage at 1 kB/s: a layer takes minutes, yet a wait asked to stop ends within a few slices.
TEST(Streamer, BlockingWaitsWakeToCheckAndCanBeInterrupted) {
  using Clock = std::chrono::steady_clock;
  auto seconds = [](Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); };
  TempFile file(200001);
  for (StreamerBackend backend : backends()) {
    StreamerOptions o = options(file.path, backend, false, 2);
    o.bandwidth_cap = 1e3;
    Streamer s(o);
    int id = s.add_layer(kLayers[1]);
    int calls = 0;
    auto t0 = Clock::now();
    EXPECT_THROW(s.acquire(id, [&] { return ++calls == 3; }), llmcad::StreamerInterrupted);
    EXPECT_EQ(calls, 3);
    EXPECT_LT(seconds(t0), 1.0);
    // another thread's interrupt() wakes a plain acquire, and holds until reset()
    std::thread other([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      s.interrupt();
    });
    t0 = Clock::now();
    EXPECT_THROW(s.acquire(id), llmcad::StreamerInterrupted);
    other.join();
    EXPECT_LT(seconds(t0), 1.0);
    EXPECT_THROW(s.acquire(id), llmcad::StreamerInterrupted);
    // reset() cancels the slow read at once (it completes even if its check asks to stop) and
    // clears the interrupt: a wait then runs until its own check asks to stop
    t0 = Clock::now();
    try {
      s.reset([] { return true; });
    } catch (const llmcad::StreamerInterrupted&) {
    }
    EXPECT_LT(seconds(t0), 1.0);
    calls = 0;
    EXPECT_THROW(s.acquire(id, [&] { return ++calls == 2; }), llmcad::StreamerInterrupted);
    EXPECT_EQ(calls, 2);
  }
}

#ifdef LLMCAD_WITH_URING
TEST(Streamer, RefusedIoUringFallsBackToPreadUnlessAskedFor) {
  TempFile file(50000);
  const bool available = llmcad::io_uring_available();
  setenv("LLMCAD_DISABLE_IO_URING", "1", 1);  // as if the kernel refused io_uring (EPERM)
  EXPECT_FALSE(llmcad::io_uring_available());
  {
    Streamer s(options(file.path, StreamerBackend::kAuto, true, 1));
    llmcad::StreamerStats st = s.stats();
    EXPECT_EQ(st.backend, "pread");
    ASSERT_FALSE(st.warnings.empty());
    EXPECT_NE(st.warnings[0].find("io_uring refused, using pread"), std::string::npos);
    int id = s.add_layer({{0, 3, 40000}});
    llmcad::LayerView v = s.acquire(id);
    EXPECT_TRUE(same(v, 0, file.bytes, {0, 3, 40000}));
  }
  int code = 0;
  try {
    Streamer s(options(file.path, StreamerBackend::kIoUring, true, 1));
  } catch (const StreamerIOError& e) {
    code = e.code();
  }
  EXPECT_EQ(code, EPERM);
  unsetenv("LLMCAD_DISABLE_IO_URING");
  EXPECT_EQ(llmcad::io_uring_available(), available);
}
#endif
