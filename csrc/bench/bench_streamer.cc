// Streamer benchmark (ctest label "bench"): a 256 MiB file read cold through the streamer, per
// backend, against a raw O_DIRECT 4 MiB sequential read loop in the same process. Prints GB/s and
// the ratio (median of repeats). A plain main: the arguments Google Benchmark takes are ignored.
// The file goes to $LLMCAD_BENCH_DIR or the working directory (the build tree, a real filesystem;
// /tmp may be tmpfs) and is deleted at the end.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "llmcad/capabilities.h"
#include "llmcad/streamer.h"

namespace {

constexpr uint64_t kFileBytes = 256ull << 20;
constexpr uint64_t kLayerBytes = 32ull << 20;
constexpr int kRepeats = 5;

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

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Streams the file as kLayerBytes layers through a 2-buffer ring; returns bytes/s.
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
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return kFileBytes / seconds;
}

double raw_once(const std::string& path) {
  llmcad::evict_from_page_cache(path);
  return llmcad::raw_direct_read_bytes_per_s(path, 4 << 20);
}

}  // namespace

int main() {
  std::string path = make_file();
  std::vector<std::pair<const char*, llmcad::StreamerBackend>> backends{{"pread", llmcad::StreamerBackend::kPread}};
  if (llmcad::io_uring_available()) backends.push_back({"io_uring", llmcad::StreamerBackend::kIoUring});
  int status = 0;
  try {
    raw_once(path);  // warm-up
    for (const auto& [name, backend] : backends) {
      std::vector<double> raw, streamed;
      bool direct = false;
      for (int r = 0; r < kRepeats; ++r) {  // interleaved so drift hits both alike
        raw.push_back(raw_once(path));
        streamed.push_back(stream_once(path, backend, &direct));
      }
      double s = median(streamed), b = median(raw);
      std::printf("streamer %-8s direct=%d buffers=2 layer=32MiB: %.3f GB/s  raw O_DIRECT 4MiB: %.3f GB/s  ratio %.3f\n",
                  name, direct, s / 1e9, b / 1e9, s / b);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_streamer: %s\n", e.what());
    status = 1;
  }
  std::remove(path.c_str());
  return status;
}
