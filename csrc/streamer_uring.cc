// io_uring backend: splits each job into chunks and keeps up to queue_depth of them in flight.
// Short reads resubmit the rest; end of file before need_end is an error. Built only with liburing.
#include <liburing.h>
#include <sys/uio.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <chrono>
#include <deque>
#include <thread>

#include "llmcad/capabilities.h"
#include "llmcad/streamer.h"

namespace llmcad {
namespace streamer_detail {
namespace {

class UringBackend final : public ReadBackend {
 public:
  explicit UringBackend(int queue_depth) : depth_(queue_depth) {
    if (io_uring_disabled_by_env())
      throw StreamerIOError(EPERM, "io_uring_queue_init refused: LLMCAD_DISABLE_IO_URING is set");
    int r = io_uring_queue_init(static_cast<unsigned>(queue_depth), &ring_, 0);
    if (r < 0) throw StreamerIOError(-r, std::string("io_uring_queue_init failed: ") + std::strerror(-r));
  }
  ~UringBackend() override { io_uring_queue_exit(&ring_); }

  const char* name() const override { return "io_uring"; }

  // Registered (fixed) buffers are pinned once, so reads skip the per-read page pinning. Optional:
  // if the kernel refuses (memlock limit), plain reads are used.
  void use_buffers(const std::vector<uint8_t*>& buffers, uint64_t bytes) override {
    std::vector<iovec> iov;
    for (uint8_t* b : buffers) iov.push_back({b, static_cast<size_t>(bytes)});
    fixed_ = io_uring_register_buffers(&ring_, iov.data(), static_cast<unsigned>(iov.size())) == 0;
  }
  bool buffers_registered() const override { return fixed_; }

  ReadFailure read(const std::vector<ReadJob>& jobs, uint64_t chunk_bytes, ReadHooks& hooks) override {
    if (broken_ && !jobs.empty()) return {0, jobs[0].offset, broken_, false};
    Run run(jobs, chunk_bytes, hooks);
    run.slots.resize(depth_);
    for (int i = depth_ - 1; i >= 0; --i) run.free.push_back(i);
    for (;;) {
      submit_more(run);
      if (run.in_flight == 0) break;
      reap(run);
    }
    return run.failure;
  }

 private:
  struct Run {
    Run(const std::vector<ReadJob>& j, uint64_t c, ReadHooks& h) : jobs(j), chunk_bytes(c), hooks(h) {}
    const std::vector<ReadJob>& jobs;
    uint64_t chunk_bytes;
    ReadHooks& hooks;
    std::vector<Chunk> slots;  // chunk in flight per slot (user_data = slot index)
    std::vector<int> free;
    std::deque<Chunk> retry;   // remainders of short reads
    size_t job = 0;            // next job to split
    uint64_t job_done = 0;     // bytes of that job already split off
    int in_flight = 0;
    ReadFailure failure;
  };

  static bool next_chunk(Run& run, Chunk* c) {
    if (!run.retry.empty()) {
      *c = run.retry.front();
      run.retry.pop_front();
      return true;
    }
    while (run.job < run.jobs.size()) {
      const ReadJob& j = run.jobs[run.job];
      if (run.job_done < j.length) {
        uint64_t n = std::min(run.chunk_bytes, j.length - run.job_done);
        *c = {static_cast<int>(run.job), j.offset + run.job_done, n, j.dest + run.job_done};
        run.job_done += n;
        return true;
      }
      ++run.job;
      run.job_done = 0;
    }
    return false;
  }

  void fail(Run& run, const Chunk& c, int code, bool eof) {
    if (!run.failure.failed()) run.failure = {c.job, c.offset, code, eof};
  }

  void submit_more(Run& run) {
    int prepared = 0;
    Chunk c;
    while (!run.failure.failed() && !run.free.empty() && next_chunk(run, &c)) {
      if (run.hooks.cancelled()) {
        fail(run, c, ECANCELED, false);
        break;
      }
      if (int injected = run.hooks.before_read(c.length)) {
        fail(run, c, injected, false);
        break;
      }
      io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
      if (!sqe) {  // cannot happen: at most depth_ reads are queued or in flight
        fail(run, c, EBUSY, false);
        break;
      }
      int slot = run.free.back();
      run.free.pop_back();
      run.slots[slot] = c;
      const ReadJob& j = run.jobs[c.job];
      if (fixed_ && j.buffer >= 0)
        io_uring_prep_read_fixed(sqe, j.fd, c.dest, static_cast<unsigned>(c.length), c.offset, j.buffer);
      else
        io_uring_prep_read(sqe, j.fd, c.dest, static_cast<unsigned>(c.length), c.offset);
      io_uring_sqe_set_data64(sqe, static_cast<uint64_t>(slot));
      ++prepared;
    }
    flush(run, prepared);
  }

  // Submits prepared SQEs; counts a read as in flight only once the kernel took it.
  void flush(Run& run, int prepared) {
    for (int spins = 0; prepared > 0;) {
      int r = io_uring_submit(&ring_);
      if (r > 0) {
        run.in_flight += r;
        prepared -= r;
      } else if (r == -EINTR) {
        continue;
      } else if ((r == 0 || r == -EAGAIN || r == -EBUSY) && run.in_flight > 0) {
        reap(run);  // make room in the completion queue, then retry
      } else if ((r == 0 || r == -EAGAIN || r == -EBUSY) && ++spins < 1000) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      } else {
        // SQEs the kernel never took would point at this layer's buffer later: retire the ring.
        broken_ = r < 0 ? -r : EBUSY;
        fail(run, run.slots[0], broken_, false);
        return;
      }
    }
  }

  // Waits for at least one completion, then handles every one available.
  void reap(Run& run) {
    io_uring_cqe* cqe = nullptr;
    int r;
    do {
      r = io_uring_wait_cqe(&ring_, &cqe);
    } while (r == -EINTR);
    if (r < 0) {
      // Cannot happen with a valid ring; drop the bookkeeping rather than spin.
      run.failure = {0, 0, -r, false};
      run.in_flight = 0;
      return;
    }
    unsigned head, seen = 0;
    io_uring_for_each_cqe(&ring_, head, cqe) {
      ++seen;
      int slot = static_cast<int>(io_uring_cqe_get_data64(cqe));
      complete(run, run.slots[slot], cqe->res);
      run.free.push_back(slot);
      --run.in_flight;
    }
    io_uring_cq_advance(&ring_, seen);
  }

  static void complete_chunk_rest(Run& run, const Chunk& c, uint64_t got) {
    const ReadJob& j = run.jobs[c.job];
    if (c.offset + got < j.need_end) run.retry.push_back({c.job, c.offset + got, c.length - got, c.dest + got});
  }

  void complete(Run& run, const Chunk& c, int res) {
    if (res < 0) return fail(run, c, -res, false);
    if (res > 0) run.hooks.bytes_done(static_cast<uint64_t>(res));
    uint64_t got = static_cast<uint64_t>(res);
    if (res == 0) {
      if (c.offset < run.jobs[c.job].need_end) fail(run, c, EIO, true);  // end of file too early
      return;
    }
    if (got < c.length) complete_chunk_rest(run, c, got);  // short read: resubmit the rest
  }

  int depth_;
  int broken_ = 0;      // errno of a failed submit; the ring is not used again
  bool fixed_ = false;  // the ring buffers are registered
  io_uring ring_;
};

}  // namespace

std::unique_ptr<ReadBackend> make_uring_backend(int queue_depth) { return std::make_unique<UringBackend>(queue_depth); }

}  // namespace streamer_detail
}  // namespace llmcad
