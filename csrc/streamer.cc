// Weight streamer: layer layout, buffer ring, IO thread, bandwidth cap, errors. See streamer.h.
#include "llmcad/streamer.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <list>
#include <mutex>
#include <thread>

#include "llmcad/capabilities.h"

#ifdef LLMCAD_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace llmcad {

using streamer_detail::ReadBackend;
using streamer_detail::ReadFailure;
using streamer_detail::ReadHooks;
using streamer_detail::ReadJob;
using Clock = std::chrono::steady_clock;

constexpr int kPreadWorkers = 8;          // pread threads at most (reads in flight)
constexpr uint64_t kHugePage = 2ull << 20;  // transparent huge page size on x86-64 and arm64 (4K granule)

namespace {

uint64_t align_down(uint64_t x) { return x / kStreamerAlign * kStreamerAlign; }
uint64_t align_up(uint64_t x) { return (x + kStreamerAlign - 1) / kStreamerAlign * kStreamerAlign; }
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }
double clock_seconds(Clock::time_point t) { return std::chrono::duration<double>(t.time_since_epoch()).count(); }

std::string errno_text(int code) { return std::strerror(code); }

// ---------------------------------------------------------------- layout
// One contiguous read: [file_start, file_end) aligned, placed at buf_pos (aligned) in the buffer;
// [lo, hi) is the part the ranges need.
struct Extent {
  int file;
  uint64_t file_start, file_end, lo, hi, buf_pos;
};

struct LayerPlan {
  std::vector<ByteRange> ranges;
  std::vector<uint64_t> offsets;  // each range's start in the buffer
  std::vector<Extent> extents;
  uint64_t layout_bytes = 0;
  uint64_t payload_bytes = 0;
};

// Ranges go in order; a range joins the last extent when it is in the same file and its aligned
// start lies inside or right after that extent, else it starts a new extent.
LayerPlan plan_layer(const std::vector<ByteRange>& ranges) {
  LayerPlan plan;
  plan.ranges = ranges;
  for (const ByteRange& r : ranges) {
    plan.payload_bytes += r.length;
    if (r.length == 0) {  // nothing to read; any offset is valid for an empty view
      plan.offsets.push_back(plan.layout_bytes);
      continue;
    }
    uint64_t a = align_down(r.offset), b = align_up(r.offset + r.length);
    Extent* last = plan.extents.empty() ? nullptr : &plan.extents.back();
    if (last && last->file == r.file && a >= last->file_start && a <= last->file_end) {
      plan.layout_bytes += std::max(b, last->file_end) - last->file_end;
      last->file_end = std::max(last->file_end, b);
      last->lo = std::min(last->lo, r.offset);
      last->hi = std::max(last->hi, r.offset + r.length);
    } else {
      plan.extents.push_back({r.file, a, b, r.offset, r.offset + r.length, plan.layout_bytes});
      plan.layout_bytes += b - a;
      last = &plan.extents.back();
    }
    plan.offsets.push_back(last->buf_pos + (r.offset - last->file_start));
  }
  return plan;
}

// ---------------------------------------------------------------- buffers
struct BufferPool {
  std::vector<uint8_t*> buffers;
  std::vector<uint8_t*> device_pointers;  // pinned: cudaHostGetDevicePointer of each buffer
  uint64_t capacity = 0;
  bool pinned = false;

  BufferPool(int count, uint64_t bytes, bool use_pinned) : capacity(bytes), pinned(use_pinned) {
    try {
      for (int i = 0; i < count; ++i) buffers.push_back(allocate());
    } catch (...) {
      release_all();
      throw;
    }
  }
  ~BufferPool() { release_all(); }
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;

  uint8_t* allocate() {
    void* p = nullptr;
#ifdef LLMCAD_WITH_CUDA
    if (pinned) {
      cudaError_t e = cudaHostAlloc(&p, capacity, cudaHostAllocPortable | cudaHostAllocMapped);
      if (e != cudaSuccess)
        throw std::runtime_error("cudaHostAlloc of " + std::to_string(capacity) + " bytes failed: " + cudaGetErrorString(e));
      if (reinterpret_cast<uintptr_t>(p) % kStreamerAlign != 0) {
        cudaFreeHost(p);
        throw std::runtime_error("cudaHostAlloc returned memory not aligned to 4096 bytes");
      }
      void* device = nullptr;
      if (cudaHostGetDevicePointer(&device, p, 0) != cudaSuccess) device = nullptr;
      device_pointers.push_back(static_cast<uint8_t*>(device));
    }
#endif
    if (!p) {
      // Huge-page aligned and advised: fewer pages to pin per O_DIRECT read, fewer TLB misses.
      uint64_t align = capacity >= kHugePage ? kHugePage : kStreamerAlign;
      int e = posix_memalign(&p, align, capacity);
      if (e != 0) throw std::runtime_error("cannot allocate a " + std::to_string(capacity) + "-byte streamer buffer: " + errno_text(e));
      if (align == kHugePage) ::madvise(p, capacity, MADV_HUGEPAGE);  // a hint: failure is harmless
    }
    std::memset(p, 0, capacity);  // fault the pages in now, not during the first reads
    return static_cast<uint8_t*>(p);
  }

  void release_all() {
    for (uint8_t* p : buffers) {
#ifdef LLMCAD_WITH_CUDA
      if (pinned) {
        cudaFreeHost(p);
        continue;
      }
#endif
      std::free(p);
    }
    buffers.clear();
  }
};

bool want_pinned(PinMode mode) {
  if (mode == PinMode::kOff) return false;
  bool available = cuda_compiled() && cuda_available();
  if (mode == PinMode::kOn && !available)
    throw std::invalid_argument("pinned=True needs a CUDA build and a CUDA device; use pinned='auto' or False");
  return available;
}

// ---------------------------------------------------------------- files
struct File {
  std::string path;
  int fd = -1;
  bool direct = false;
};

constexpr int kNotRegular = ENODEV;  // open_file's error for a FIFO, device, socket or directory

// A descriptor on a regular file, or -errno (-kNotRegular: something else). Opened O_NONBLOCK so a FIFO
// in place of a weight file cannot block the open; the flag is cleared once the file is known to be
// regular (io_uring would otherwise answer EAGAIN rather than wait for a buffered read).
int open_file(const std::string& path, bool direct) {
  int flags = O_RDONLY | O_CLOEXEC | O_NONBLOCK | (direct ? O_DIRECT : 0);
  int fd;
  do {
    fd = ::open(path.c_str(), flags);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) return -errno;
  struct stat st;
  int code = ::fstat(fd, &st) != 0 ? errno : !S_ISREG(st.st_mode) ? kNotRegular
           : ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) != 0 ? errno : 0;
  if (code == 0) return fd;
  ::close(fd);
  return -code;
}

std::string open_error(const std::string& what, const std::string& path, int code) {
  if (code == kNotRegular) return what + " '" + path + "': not a regular file (a FIFO, device or directory)";
  return what + " '" + path + "': " + errno_text(code);
}

// ---------------------------------------------------------------- bandwidth cap
// Token bucket as a virtual clock: each read of n bytes moves `next_` by n / rate; at most
// burst_s worth of bytes may go out at once.
// Thread-safe: pread workers take tokens concurrently.
class TokenBucket {
 public:
  explicit TokenBucket(double bytes_per_s) : rate_(bytes_per_s), next_(Clock::now()) {}
  void take(uint64_t n, const std::atomic<bool>& cancel) {
    if (rate_ <= 0) return;
    Clock::time_point due;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto floor = Clock::now() - std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(kBurstS));
      next_ = std::max(next_, floor) + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(n / rate_));
      due = next_;
    }
    for (auto now = Clock::now(); !cancel.load() && now < due; now = Clock::now())
      std::this_thread::sleep_for(std::min<Clock::duration>(due - now, std::chrono::milliseconds(10)));
  }

 private:
  static constexpr double kBurstS = 0.02;
  double rate_;
  std::mutex mu_;
  Clock::time_point next_;
};

std::unique_ptr<ReadBackend> make_pread(int queue_depth) {
  return streamer_detail::make_pread_backend(std::min(queue_depth, kPreadWorkers));
}

std::unique_ptr<ReadBackend> choose_backend(StreamerBackend kind, int queue_depth, std::string* note) {
  if (kind == StreamerBackend::kPread) return make_pread(queue_depth);
  if (!io_uring_compiled()) {
    if (kind == StreamerBackend::kIoUring)
      throw std::invalid_argument("backend='io_uring' but this build has no io_uring (liburing was missing at build time)");
    return make_pread(queue_depth);
  }
#ifdef LLMCAD_WITH_URING
  try {
    return streamer_detail::make_uring_backend(queue_depth);
  } catch (const StreamerIOError& e) {
    if (kind == StreamerBackend::kIoUring) throw;
    *note = std::string("io_uring refused, using pread: ") + e.what();
  }
#endif
  return make_pread(queue_depth);
}

void validate(const StreamerOptions& o) {
  auto bad = [](const std::string& m) { throw std::invalid_argument(m); };
  if (o.paths.empty()) bad("the streamer needs at least one file path");
  if (o.buffer_bytes == 0) bad("buffer_bytes must be > 0");
  if (o.num_buffers < 1 || o.num_buffers > 64) bad("num_buffers must be in 1..64, got " + std::to_string(o.num_buffers));
  if (o.queue_depth < 1 || o.queue_depth > 4096) bad("queue_depth must be in 1..4096, got " + std::to_string(o.queue_depth));
  if (o.chunk_bytes < kStreamerAlign || o.chunk_bytes % kStreamerAlign != 0 || o.chunk_bytes > (1u << 30))
    bad("chunk_bytes must be a multiple of 4096 in [4096, 1 GiB], got " + std::to_string(o.chunk_bytes));
  if (!std::isfinite(o.bandwidth_cap) || o.bandwidth_cap < 0)
    bad("bandwidth_cap must be a finite number of bytes/s >= 0 (0: uncapped)");
}

}  // namespace

// ---------------------------------------------------------------- streamer state
struct Streamer::Impl final : ReadHooks {
  enum class State { kQueued, kLoading, kLoaded, kFailed, kHeld };
  struct Request {
    explicit Request(int l) : layer(l) {}
    int layer;
    State state = State::kQueued;
    int slot = -1;
    int code = 0;
    std::string error;
  };

  StreamerOptions opt;
  std::vector<File> files;
  std::deque<LayerPlan> layers;  // a deque: the IO thread keeps references while add_layer appends
  std::shared_ptr<BufferPool> pool;
  std::unique_ptr<ReadBackend> backend;
  TokenBucket bucket;

  mutable std::mutex mu;
  std::condition_variable cv;
  std::list<Request> requests;  // oldest first; held ones form the front
  std::vector<int> free_slots;
  bool loading = false;
  bool closed = false;
  uint64_t generation = 0;  // bumped by reset()
  bool interrupted = false;  // set by interrupt(), cleared by reset()
  std::atomic<bool> cancel{false};
  std::thread io_thread;

  std::atomic<uint64_t> bytes_read{0}, reads{0};
  std::atomic<int64_t> fault_at{-1};
  std::atomic<int> fault_code{0};
  uint64_t layers_loaded = 0, errors = 0;
  double acquire_wait_s = 0, io_busy_s = 0;
  std::vector<std::string> warnings;
  std::deque<LoadRecord> load_log;  // the newest kMaxLoadRecords finished loads
  uint64_t loads_finished = 0;      // seq of the next record

  void record_load(int layer, Clock::time_point t0, Clock::time_point t1, bool ok) {
    load_log.push_back({loads_finished++, layer, clock_seconds(t0), clock_seconds(t1), layers[layer].payload_bytes, ok});
    if (load_log.size() > kMaxLoadRecords) load_log.pop_front();
  }

  explicit Impl(StreamerOptions o) : opt(std::move(o)), bucket(opt.bandwidth_cap) {}
  ~Impl() override {
    for (File& f : files)
      if (f.fd >= 0) ::close(f.fd);
  }

  // ReadHooks
  int before_read(uint64_t n) override {
    bucket.take(n, cancel);
    int64_t index = static_cast<int64_t>(reads.fetch_add(1));
    int64_t at = fault_at.load();
    if (at >= 0 && index == at && fault_at.compare_exchange_strong(at, -1)) return fault_code.load();
    return 0;
  }
  void bytes_done(uint64_t n) override { bytes_read.fetch_add(n); }
  bool cancelled() const override { return cancel.load(); }

  void open_files() {
    for (const std::string& path : opt.paths) {
      File f{path, -1, opt.direct};
      int fd = open_file(path, f.direct);
      if (fd == -EINVAL && f.direct) {  // e.g. tmpfs: no O_DIRECT
        warnings.push_back("O_DIRECT refused for '" + path + "' (" + errno_text(EINVAL) + "); using buffered reads");
        f.direct = false;
        fd = open_file(path, false);
      }
      if (fd < 0) throw StreamerIOError(-fd, open_error("cannot open weight file", path, -fd));
      f.fd = fd;
      files.push_back(f);
    }
  }

  // O_DIRECT read refused at the first read: clear O_DIRECT on the same descriptor (never reopen by
  // path: the path may name another file by now) and record a warning.
  bool fall_back_to_buffered(int file) {
    File& f = files[file];
    int flags = ::fcntl(f.fd, F_GETFL);
    if (flags < 0 || ::fcntl(f.fd, F_SETFL, flags & ~O_DIRECT) != 0) return false;
    std::lock_guard<std::mutex> lock(mu);
    f.direct = false;
    warnings.push_back("O_DIRECT read refused for '" + f.path + "' (" + errno_text(EINVAL) + "); using buffered reads");
    return true;
  }

  // Direct files read whole aligned extents; buffered files read just the bytes needed.
  std::vector<ReadJob> make_jobs(const LayerPlan& plan, int slot) const {
    std::vector<ReadJob> jobs;
    uint8_t* buf = pool->buffers[slot];
    for (const Extent& e : plan.extents) {
      const File& f = files[e.file];
      uint64_t start = f.direct ? e.file_start : e.lo, end = f.direct ? e.file_end : e.hi;
      jobs.push_back({e.file, f.fd, start, end - start, e.hi, buf + e.buf_pos + (start - e.file_start), slot});
    }
    return jobs;
  }

  std::string describe(const ReadFailure& f, const std::vector<ReadJob>& jobs) const {
    const ReadJob& job = jobs[f.job];
    const std::string& path = files[job.file].path;
    if (f.eof)
      return "reading '" + path + "' at offset " + std::to_string(f.offset) + ": unexpected end of file before offset " +
             std::to_string(job.need_end) + " (" + errno_text(EIO) + "; was the file truncated after it was indexed?)";
    return "reading '" + path + "' at offset " + std::to_string(f.offset) + " failed: " + errno_text(f.code);
  }

  // Returns an empty string on success, else the error message (code in *code).
  std::string load(const LayerPlan& plan, int slot, int* code) {
    for (;;) {
      std::vector<ReadJob> jobs = make_jobs(plan, slot);
      ReadFailure f = backend->read(jobs, opt.chunk_bytes, *this);
      if (!f.failed()) return {};
      int file = jobs[f.job].file;
      if (f.code == EINVAL && !f.eof && files[file].direct && fall_back_to_buffered(file)) continue;
      *code = f.code;
      if (f.code == ECANCELED) return "cancelled";
      return describe(f, jobs);
    }
  }

  void io_loop() {
    std::unique_lock<std::mutex> lock(mu);
    for (;;) {
      auto next = requests.end();
      cv.wait(lock, [&] {
        if (closed) return true;
        next = std::find_if(requests.begin(), requests.end(), [](const Request& r) { return r.state == State::kQueued; });
        return next != requests.end() && !free_slots.empty() && !cancel.load();
      });
      if (closed) return;
      next->slot = free_slots.back();
      free_slots.pop_back();
      next->state = State::kLoading;
      loading = true;
      const LayerPlan& plan = layers[next->layer];
      int slot = next->slot;
      lock.unlock();

      auto t0 = Clock::now();
      int code = 0;
      std::string error = load(plan, slot, &code);
      auto t1 = Clock::now();

      lock.lock();
      io_busy_s += std::chrono::duration<double>(t1 - t0).count();
      loading = false;
      if (code != ECANCELED) record_load(next->layer, t0, t1, error.empty());  // a cancelled load is no load
      if (error.empty()) {
        next->state = State::kLoaded;
        ++layers_loaded;
      } else {
        next->state = State::kFailed;
        next->code = code;
        next->error = error;
        free_slots.push_back(next->slot);
        next->slot = -1;
        if (code != ECANCELED) ++errors;  // a cancelled read (reset, close) is not a failure
      }
      cv.notify_all();
    }
  }

  void check_open() const {
    if (closed) throw std::invalid_argument("the weight streamer is closed");
  }
  void check_layer(int layer) const {
    if (layer < 0 || layer >= static_cast<int>(layers.size()))
      throw std::invalid_argument("unknown layer id " + std::to_string(layer) + " (add_layer returned 0.." +
                                  std::to_string(static_cast<int>(layers.size()) - 1) + ")");
  }
  std::list<Request>::iterator next_to_acquire() {
    return std::find_if(requests.begin(), requests.end(), [](const Request& r) { return r.state != State::kHeld; });
  }
  size_t held_count() const {
    return std::count_if(requests.begin(), requests.end(), [](const Request& r) { return r.state == State::kHeld; });
  }
};

// ---------------------------------------------------------------- public API
Streamer::Streamer(StreamerOptions options) {
  validate(options);
  options.buffer_bytes = streamer_buffer_capacity(options.buffer_bytes, options.paths.size());
  bool pinned = want_pinned(options.pinned);
  impl_ = std::make_unique<Impl>(std::move(options));
  Impl& s = *impl_;
  s.open_files();
  std::string note;
  s.backend = choose_backend(s.opt.backend, s.opt.queue_depth, &note);
  if (!note.empty()) s.warnings.push_back(note);
  s.pool = std::make_shared<BufferPool>(s.opt.num_buffers, s.opt.buffer_bytes, pinned);
  s.backend->use_buffers(s.pool->buffers, s.pool->capacity);
  for (int i = s.opt.num_buffers - 1; i >= 0; --i) s.free_slots.push_back(i);
  s.io_thread = std::thread([&s] { s.io_loop(); });
}

Streamer::~Streamer() { close(); }

int Streamer::add_layer(const std::vector<ByteRange>& ranges) {
  Impl& s = *impl_;
  std::lock_guard<std::mutex> lock(s.mu);
  s.check_open();
  for (size_t i = 0; i < ranges.size(); ++i) {
    const ByteRange& r = ranges[i];
    if (r.file < 0 || r.file >= static_cast<int>(s.files.size()))
      throw std::invalid_argument("range " + std::to_string(i) + ": file index " + std::to_string(r.file) +
                                  " out of range (the streamer has " + std::to_string(s.files.size()) + " files)");
    if (r.offset > UINT64_MAX / 2 || r.length > UINT64_MAX / 2)
      throw std::invalid_argument("range " + std::to_string(i) + ": offset or length too large");
  }
  LayerPlan plan = plan_layer(ranges);
  if (plan.layout_bytes > s.opt.buffer_bytes)
    throw std::invalid_argument("layer needs " + std::to_string(plan.layout_bytes) + " buffer bytes (" +
                                std::to_string(plan.payload_bytes) + " payload + 4096-byte alignment) but a buffer holds " +
                                std::to_string(s.opt.buffer_bytes) + "; raise buffer_bytes");
  s.layers.push_back(std::move(plan));
  return static_cast<int>(s.layers.size()) - 1;
}

void Streamer::prefetch(int layer) {
  Impl& s = *impl_;
  std::lock_guard<std::mutex> lock(s.mu);
  s.check_open();
  s.check_layer(layer);
  s.requests.emplace_back(layer);
  s.cv.notify_all();
}

LayerView Streamer::acquire(int layer, const WaitCheck& check) {
  Impl& s = *impl_;
  std::unique_lock<std::mutex> lock(s.mu);
  s.check_open();
  s.check_layer(layer);
  auto it = s.next_to_acquire();
  if (it == s.requests.end()) {
    s.requests.emplace_back(layer);
    it = std::prev(s.requests.end());
    s.cv.notify_all();
  } else if (it->layer != layer) {
    throw std::invalid_argument("acquire(" + std::to_string(layer) + ") out of order: layer " + std::to_string(it->layer) +
                                " was prefetched earlier and must be acquired first (or call reset())");
  }
  if (it->state == Impl::State::kQueued && s.free_slots.empty() && !s.loading &&
      s.held_count() >= static_cast<size_t>(s.opt.num_buffers))
    throw std::invalid_argument("acquire(" + std::to_string(layer) + "): all " + std::to_string(s.opt.num_buffers) +
                                " buffers are held; release a layer first");
  uint64_t generation = s.generation;
  auto t0 = Clock::now();
  auto woken = [&] {
    return s.closed || s.generation != generation || s.interrupted ||
           it->state == Impl::State::kLoaded || it->state == Impl::State::kFailed;
  };
  bool stop = false;
  while (!stop && !s.cv.wait_for(lock, std::chrono::milliseconds(kWaitSliceMs), woken)) {
    if (!check) continue;
    lock.unlock();  // the check may block (a binding takes its interpreter lock)
    stop = check();
    lock.lock();
  }
  s.acquire_wait_s += seconds_since(t0);
  if (s.closed) throw std::invalid_argument("the weight streamer was closed while acquire() waited");
  if (stop || s.interrupted)
    throw StreamerInterrupted("acquire(" + std::to_string(layer) + ") interrupted while its layer was being read");
  if (s.generation != generation) throw std::invalid_argument("the weight streamer was reset while acquire() waited");
  if (it->state == Impl::State::kFailed) {
    StreamerIOError error(it->code, it->error);
    s.requests.erase(it);
    throw error;
  }
  it->state = Impl::State::kHeld;
  const LayerPlan& plan = s.layers[layer];
  LayerView view;
  view.layer = layer;
  view.data = s.pool->buffers[it->slot];
  if (!s.pool->device_pointers.empty()) view.device_data = s.pool->device_pointers[it->slot];
  view.size = plan.layout_bytes;
  view.offsets = plan.offsets;
  for (const ByteRange& r : plan.ranges) view.lengths.push_back(r.length);
  view.owner = s.pool;
  return view;
}

void Streamer::release(int layer) {
  Impl& s = *impl_;
  std::lock_guard<std::mutex> lock(s.mu);
  s.check_open();
  s.check_layer(layer);
  auto it = std::find_if(s.requests.begin(), s.requests.end(),
                         [&](const Impl::Request& r) { return r.layer == layer && r.state == Impl::State::kHeld; });
  if (it == s.requests.end())
    throw std::invalid_argument("release(" + std::to_string(layer) + "): layer " + std::to_string(layer) +
                                " is not acquired (released twice, or never acquired)");
  s.free_slots.push_back(it->slot);
  s.requests.erase(it);
  s.cv.notify_all();
}

void Streamer::reset(const WaitCheck& check) {
  Impl& s = *impl_;
  std::unique_lock<std::mutex> lock(s.mu);
  s.check_open();
  s.cancel = true;
  bool stop = false;
  while (!s.cv.wait_for(lock, std::chrono::milliseconds(kWaitSliceMs), [&] { return !s.loading; })) {
    if (!check || stop) continue;  // reads check `cancel` often: finishing the reset is quick
    lock.unlock();
    stop = check();
    lock.lock();
  }
  s.requests.clear();
  s.free_slots.clear();
  for (int i = s.opt.num_buffers - 1; i >= 0; --i) s.free_slots.push_back(i);
  s.cancel = false;
  s.interrupted = false;
  ++s.generation;
  s.cv.notify_all();
  if (stop) throw StreamerInterrupted("reset() interrupted (the reset completed)");
}

void Streamer::interrupt() {
  Impl& s = *impl_;
  std::lock_guard<std::mutex> lock(s.mu);
  s.interrupted = true;
  s.cv.notify_all();
}

void Streamer::close() {
  if (!impl_) return;
  Impl& s = *impl_;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (s.closed) return;
    s.closed = true;
    s.cancel = true;
    s.cv.notify_all();
  }
  if (s.io_thread.joinable()) s.io_thread.join();
  std::lock_guard<std::mutex> lock(s.mu);
  s.requests.clear();
  s.free_slots.clear();
  s.pool.reset();  // views handed out keep the memory until they are gone
  s.backend.reset();
  for (File& f : s.files)
    if (f.fd >= 0) {
      ::close(f.fd);
      f.fd = -1;
    }
}

void Streamer::inject_fault(uint64_t read_index, int code) {
  if (code <= 0) throw std::invalid_argument("inject_fault: errno must be > 0, got " + std::to_string(code));
  impl_->fault_code = code;
  impl_->fault_at = static_cast<int64_t>(impl_->reads.load() + read_index);
}

bool Streamer::next_ready() const {
  const Impl& s = *impl_;
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = std::find_if(s.requests.begin(), s.requests.end(), [](const Impl::Request& r) { return r.state != Impl::State::kHeld; });
  return it != s.requests.end() && (it->state == Impl::State::kLoaded || it->state == Impl::State::kFailed);
}

std::vector<LoadRecord> Streamer::loads_since(uint64_t since) const {
  const Impl& s = *impl_;
  std::lock_guard<std::mutex> lock(s.mu);
  std::vector<LoadRecord> out;
  for (const LoadRecord& r : s.load_log)
    if (r.seq >= since) out.push_back(r);
  return out;
}

uint64_t Streamer::loads_finished() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->loads_finished;
}

int Streamer::num_layers() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return static_cast<int>(impl_->layers.size());
}

uint64_t Streamer::layer_bytes(int layer) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->check_layer(layer);
  return impl_->layers[layer].payload_bytes;
}

uint64_t Streamer::layout_bytes(int layer) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->check_layer(layer);
  return impl_->layers[layer].layout_bytes;
}

std::vector<FileIdentity> Streamer::file_identities() const {
  const Impl& s = *impl_;
  std::lock_guard<std::mutex> lock(s.mu);
  s.check_open();
  std::vector<FileIdentity> out;
  for (const File& f : s.files) {
    struct stat st;
    if (::fstat(f.fd, &st) != 0) throw StreamerIOError(errno, "fstat of '" + f.path + "' failed: " + errno_text(errno));
    out.push_back({static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino), static_cast<uint64_t>(st.st_size),
                   static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec,
                   static_cast<int64_t>(st.st_ctim.tv_sec) * 1000000000 + st.st_ctim.tv_nsec,
                   static_cast<uint64_t>(st.st_nlink)});
  }
  return out;
}

StreamerStats Streamer::stats() const {
  const Impl& s = *impl_;
  std::lock_guard<std::mutex> lock(s.mu);
  StreamerStats st;
  st.backend = s.backend ? s.backend->name() : "closed";
  st.direct = std::all_of(s.files.begin(), s.files.end(), [](const File& f) { return f.direct; });
  st.pinned = s.pool ? s.pool->pinned : false;
  st.registered = s.backend ? s.backend->buffers_registered() : false;
  st.num_buffers = s.opt.num_buffers;
  st.buffer_bytes = s.opt.buffer_bytes;
  st.memory_bytes = s.pool ? s.pool->capacity * s.pool->buffers.size() : 0;
  st.bytes_read = s.bytes_read.load();
  st.reads = s.reads.load();
  st.layers_loaded = s.layers_loaded;
  st.errors = s.errors;
  st.acquire_wait_s = s.acquire_wait_s;
  st.io_busy_s = s.io_busy_s;
  st.warnings = s.warnings;
  return st;
}

// ---------------------------------------------------------------- helpers
double streamer_clock_s() { return clock_seconds(Clock::now()); }

uint64_t streamer_layout_bytes(const std::vector<ByteRange>& ranges) { return plan_layer(ranges).layout_bytes; }

uint64_t streamer_buffer_capacity(uint64_t buffer_bytes, size_t num_files) {
  return align_up(buffer_bytes + 2 * kStreamerAlign * num_files);
}

uint64_t streamer_buffer_bytes_for(const std::vector<ByteRange>& ranges, size_t num_files) {
  LayerPlan plan = plan_layer(ranges);
  uint64_t slack = 2 * kStreamerAlign * num_files;
  uint64_t need = std::max(plan.payload_bytes, plan.layout_bytes > slack ? plan.layout_bytes - slack : 0);
  return std::max<uint64_t>(need, 1);  // buffer_bytes must be > 0, even for a layer of empty ranges
}

uint64_t streamer_memory_bytes(uint64_t buffer_bytes, int num_buffers, size_t num_files) {
  return static_cast<uint64_t>(std::max(num_buffers, 0)) * streamer_buffer_capacity(buffer_bytes, num_files);
}

void evict_from_page_cache(const std::string& path) {
  int fd = open_file(path, false);
  if (fd < 0) throw StreamerIOError(-fd, open_error("cannot open", path, -fd));
  ::fdatasync(fd);  // dirty pages (a file just written) cannot be dropped
  int e = ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
  if (e != 0) throw StreamerIOError(e, "posix_fadvise(DONTNEED) on '" + path + "' failed: " + errno_text(e));
}

double raw_direct_read_bytes_per_s(const std::string& path, uint64_t block_bytes) {
  if (block_bytes == 0 || block_bytes % kStreamerAlign != 0)
    throw std::invalid_argument("block_bytes must be a positive multiple of 4096");
  int fd = open_file(path, true);
  if (fd < 0) throw StreamerIOError(-fd, open_error("cannot open (O_DIRECT)", path, -fd));
  void* buf = nullptr;
  if (posix_memalign(&buf, kStreamerAlign, block_bytes) != 0) {
    ::close(fd);
    throw std::runtime_error("cannot allocate the read block");
  }
  std::memset(buf, 0, block_bytes);
  uint64_t total = 0;
  int code = 0;
  auto t0 = Clock::now();
  for (;;) {
    ssize_t got = ::pread(fd, buf, block_bytes, static_cast<off_t>(total));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) code = errno;
    if (got <= 0) break;
    total += static_cast<uint64_t>(got);
  }
  double seconds = seconds_since(t0);
  std::free(buf);
  ::close(fd);
  if (code) throw StreamerIOError(code, "reading '" + path + "' at offset " + std::to_string(total) + " failed: " + errno_text(code));
  return seconds > 0 ? total / seconds : 0.0;
}

}  // namespace llmcad
