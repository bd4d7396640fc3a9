// Streamer benchmark (ctest label "bench"): a 256 MiB file read cold through the streamer, per
// backend, against a raw O_DIRECT 4 MiB sequential read loop in the same iteration (the baseline).
// Each iteration reads the file both ways, cold; the reported time is the streamed read's, and the
// counters give both rates in GB/s and their ratio (streamed / raw). The file goes to
// $LLMCAD_BENCH_DIR or the working directory (the build tree, a real filesystem; /tmp may be tmpfs)
// and is deleted at the end.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include "llmcad/capabilities.h"
#include "llmcad/streamer.h"

namespace {

constexpr uint64_t kFileBytes = 256ull << 20;
constexpr uint64_t kLayerBytes = 32ull << 20;

std::string make_file() {
  const char* dir = std::getenv("LLMCAD_BENCH_DIR");
  std::string path = std::string(dir ? dir : ".") + "/llmcad_bench_streamer_" + std::to_string(getpid()) + ".bin";
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) {
    std::perror(path.c_str());
    std::exit(1);
  }
  std::mt19937_64 rng(0);
  std::vector<uint64_t> block(1 << 17);  // 1 MiB
  for (uint64_t done = 0; done < kFileBytes; done += block.size() * 8) {
    for (auto& w : block) w = rng();
    std::fwrite(block.data(), 8, block.size(), f);
  }
  std::fclose(f);
  return path;
}

const std::string& bench_file() {
  static const std::string path = make_file();
  return path;
}

// Streams the file as kLayerBytes layers through a 2-buffer ring; returns seconds.
double stream_once(const std::string& path, llmcad::StreamerBackend backend, bool* direct) {
  llmcad::StreamerOptions o;
  o.paths = {path};
  o.buffer_bytes = kLayerBytes;
  o.num_buffers = 2;
  o.backend = backend;
  llmcad::Streamer s(o);
  *direct = s.stats().direct;
  std::vector<int> ids;
  for (uint64_t off = 0; off < kFileBytes; off += kLayerBytes) ids.push_back(s.add_layer({{0, off, kLayerBytes}}));
  llmcad::evict_from_page_cache(path);
  auto t0 = std::chrono::steady_clock::now();
  for (int id : ids) s.prefetch(id);
  for (int id : ids) {
    s.acquire(id);
    s.release(id);
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double raw_once(const std::string& path) {
  llmcad::evict_from_page_cache(path);
  return llmcad::raw_direct_read_bytes_per_s(path, 4 << 20);
}

// Arg 0: pread, 1: io_uring.
void BM_StreamerVsRawDirectRead(benchmark::State& state) {
  bool uring = state.range(0) == 1;
  if (uring && !llmcad::io_uring_available()) {
    state.SkipWithError("io_uring is not available here");
    return;
  }
  const std::string& path = bench_file();
  auto backend = uring ? llmcad::StreamerBackend::kIoUring : llmcad::StreamerBackend::kPread;
  double raw_rate = 0, streamed_rate = 0;
  bool direct = false;
  for (auto _ : state) {
    raw_rate += raw_once(path);  // the baseline, cold, in the same iteration
    double seconds = stream_once(path, backend, &direct);
    streamed_rate += kFileBytes / seconds;
    state.SetIterationTime(seconds);
  }
  double n = static_cast<double>(state.iterations());
  state.counters["streamed_GBps"] = streamed_rate / n / 1e9;
  state.counters["raw_GBps"] = raw_rate / n / 1e9;
  state.counters["ratio"] = streamed_rate / raw_rate;
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kFileBytes));
  state.SetLabel(std::string(uring ? "io_uring" : "pread") + (direct ? " O_DIRECT" : " buffered") +
                 ", 2 buffers of 32 MiB");
}
BENCHMARK(BM_StreamerVsRawDirectRead)->Arg(0)->Arg(1)->UseManualTime()->Iterations(1)->Repetitions(5)
    ->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  int status = 0;
  try {
    raw_once(bench_file());  // warm-up: the file exists and the device is awake
    benchmark::RunSpecifiedBenchmarks();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_streamer: %s\n", e.what());
    status = 1;
  }
  benchmark::Shutdown();
  std::remove(bench_file().c_str());
  return status;
}
