// pread backend: always available. A layer is split into chunks that `workers` threads read in
// order with synchronous pread, so several reads are in flight like io_uring's queue (one worker:
// strictly sequential). Short reads read the rest; end of file before need_end is an error.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <mutex>
#include <system_error>
#include <thread>

#include "llmcad/streamer.h"

namespace llmcad {
namespace streamer_detail {
namespace {

std::vector<Chunk> split(const std::vector<ReadJob>& jobs, uint64_t chunk_bytes) {
  std::vector<Chunk> chunks;
  for (size_t j = 0; j < jobs.size(); ++j)
    for (uint64_t done = 0; done < jobs[j].length; done += chunk_bytes)
      chunks.push_back({static_cast<int>(j), jobs[j].offset + done, std::min(chunk_bytes, jobs[j].length - done),
                        jobs[j].dest + done});
  return chunks;
}

ReadFailure read_chunk(const ReadJob& job, const Chunk& c, ReadHooks& hooks) {
  uint64_t done = 0;
  while (done < c.length) {
    uint64_t offset = c.offset + done;
    if (offset >= job.need_end) break;  // the rest lies past the bytes asked for (file tail)
    if (hooks.cancelled()) return {c.job, offset, ECANCELED, false};
    uint64_t n = c.length - done;
    if (int injected = hooks.before_read(n)) return {c.job, offset, injected, false};
    ssize_t got;
    do {
      got = ::pread(job.fd, c.dest + done, n, static_cast<off_t>(offset));
    } while (got < 0 && errno == EINTR);
    if (got < 0) return {c.job, offset, errno, false};
    if (got == 0) return {c.job, offset, EIO, true};  // end of file before need_end
    hooks.bytes_done(static_cast<uint64_t>(got));
    done += static_cast<uint64_t>(got);  // a short read: the loop asks for the rest
  }
  return {};
}

class PreadBackend final : public ReadBackend {
 public:
  explicit PreadBackend(int workers) : workers_(std::max(1, workers)) {}

  const char* name() const override { return "pread"; }

  ReadFailure read(const std::vector<ReadJob>& jobs, uint64_t chunk_bytes, ReadHooks& hooks) override {
    std::vector<Chunk> chunks = split(jobs, chunk_bytes);
    std::atomic<size_t> next{0};
    std::atomic<bool> stop{false};
    std::mutex mu;
    ReadFailure first;
    auto work = [&] {
      for (size_t i; !stop.load() && (i = next.fetch_add(1)) < chunks.size();) {
        ReadFailure f = read_chunk(jobs[chunks[i].job], chunks[i], hooks);
        if (!f.failed()) continue;
        std::lock_guard<std::mutex> lock(mu);
        if (!first.failed()) first = f;
        stop = true;
      }
    };
    std::vector<std::thread> helpers;
    size_t wanted = std::min<size_t>(static_cast<size_t>(workers_), chunks.size());
    for (size_t k = 1; k < wanted; ++k) {
      try {
        helpers.emplace_back(work);
      } catch (const std::system_error&) {
        break;  // no more threads: fewer reads in flight, same result
      }
    }
    work();
    for (std::thread& t : helpers) t.join();
    return first;
  }

 private:
  int workers_;
};

}  // namespace

std::unique_ptr<ReadBackend> make_pread_backend(int workers) { return std::make_unique<PreadBackend>(workers); }

}  // namespace streamer_detail
}  // namespace llmcad
