// Weight streamer: reads layers (lists of byte ranges in files) into an N-buffer ring from a
// background IO thread, so storage reads overlap the consumer's compute.
//
// Ordering contract (a ring, FIFO):
//   - prefetch(layer) appends a request to a FIFO queue; the IO thread loads requests in queue
//     order, each into a free buffer, so at most num_buffers layers are loaded or held at once.
//     The same layer may be queued again later (e.g. the next forward pass).
//   - acquire(layer) takes the oldest request that has not been acquired yet; `layer` must be that
//     request's layer. When nothing is queued, acquire queues it itself. It blocks until the layer
//     is loaded and returns a view valid until release(layer).
//   - release(layer) frees the buffer of the oldest held request of that layer for the next read.
//     Any release order is allowed; releasing returns the buffer to a free pool.
//   - reset() drops every queued, loaded and held request (waiting for a read in flight), e.g.
//     after the consumer raised midway. close() stops the IO thread; both are idempotent.
// Misuse throws std::invalid_argument naming the problem, never hangs: acquiring a layer that is
// not next in order, acquiring while every buffer is held (the read could never start), releasing
// a layer that is not held (double release), unknown layer ids, any call after close().
//
// Reads: O_DIRECT when asked and the filesystem allows it (EINVAL at open or at the first read
// falls back to buffered reads for that file and records a warning). Each layer's ranges are laid
// out in the buffer as 4096-aligned extents (adjacent ranges of one file share an extent), so a
// range's offset inside the buffer is congruent to its file offset modulo 4096.
// Buffers are allocated once: cudaHostAlloc when pinned, else 2 MiB-aligned host memory advised
// for transparent huge pages (fewer pages to pin per O_DIRECT read); io_uring registers them.
// Failures (EIO, EOF before a range ends, a refused read) throw StreamerIOError at acquire(),
// naming the file, the offset and the errno text; the streamer stays usable afterwards.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace llmcad {

constexpr uint64_t kStreamerAlign = 4096;  // O_DIRECT alignment of buffers, offsets and lengths

struct ByteRange {
  int32_t file = 0;     // index into StreamerOptions::paths
  uint64_t offset = 0;  // bytes from the start of the file
  uint64_t length = 0;  // bytes
};

enum class StreamerBackend { kAuto, kIoUring, kPread };
enum class PinMode { kAuto, kOn, kOff };  // kAuto: cudaHostAlloc when a CUDA device is present

struct StreamerOptions {
  std::vector<std::string> paths;
  uint64_t buffer_bytes = 0;  // payload capacity of one buffer; it holds streamer_buffer_capacity() bytes
  int num_buffers = 2;
  StreamerBackend backend = StreamerBackend::kAuto;
  bool direct = true;                // try O_DIRECT
  int queue_depth = 64;              // reads in flight: io_uring entries; pread threads (at most 8)
  uint64_t chunk_bytes = 1 << 20;    // size of one read (multiple of 4096)
  double bandwidth_cap = 0;          // bytes/s token bucket; <= 0: uncapped
  PinMode pinned = PinMode::kAuto;
};

// A failed read or open. code() is the errno (EIO for an unexpected end of file).
// A blocking wait abandoned: its WaitCheck asked to stop, or interrupt() was called.
class StreamerInterrupted : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Called every kWaitSliceMs while acquire() or reset() blocks, without the streamer's lock held (a
// binding uses it to run signal handlers, e.g. Ctrl-C). Returning true abandons the wait.
using WaitCheck = std::function<bool()>;
constexpr int kWaitSliceMs = 50;

class StreamerIOError : public std::runtime_error {
 public:
  StreamerIOError(int code, const std::string& message) : std::runtime_error(message), code_(code) {}
  int code() const { return code_; }

 private:
  int code_;
};

struct LayerView {
  int layer = -1;
  uint8_t* data = nullptr;        // start of the buffer
  uint8_t* device_data = nullptr; // the same memory as a CUDA device pointer (pinned buffers), else null
  uint64_t size = 0;              // bytes of the buffer this layer occupies
  std::vector<uint64_t> offsets;  // each range's start inside the buffer
  std::vector<uint64_t> lengths;  // each range's length
  std::shared_ptr<void> owner;    // keeps the buffer memory alive (even after close())
};

struct StreamerStats {
  std::string backend;          // "io_uring" or "pread": the one in use
  bool direct = false;          // every file is read with O_DIRECT
  bool pinned = false;          // buffers come from cudaHostAlloc
  bool registered = false;      // buffers are io_uring fixed buffers (pinned for the kernel once)
  int num_buffers = 0;
  uint64_t buffer_bytes = 0;    // capacity of one buffer
  uint64_t memory_bytes = 0;    // all buffer memory held
  uint64_t bytes_read = 0;      // from storage, cumulative
  uint64_t reads = 0;           // read calls issued (pread calls or io_uring submissions)
  uint64_t layers_loaded = 0;
  uint64_t errors = 0;          // failed layer loads
  double acquire_wait_s = 0;    // consumer time blocked in acquire()
  double io_busy_s = 0;         // IO thread time spent loading layers
  std::vector<std::string> warnings;  // e.g. O_DIRECT refused for a file (buffered reads instead)
};

// What fstat says of a file the streamer reads (the descriptor it opened, not the path now).
struct FileIdentity {
  uint64_t dev = 0, ino = 0, size = 0;
  int64_t mtime_ns = 0, ctime_ns = 0;
  uint64_t nlink = 0;
};

// One finished layer load, successful or failed (a load cancelled by reset() or close() is not
// recorded). Times are steady_clock seconds (see streamer_clock_s()).
struct LoadRecord {
  uint64_t seq = 0;    // 0, 1, ... in the order loads finished, over the streamer's life
  int layer = -1;      // the id add_layer returned
  double start_s = 0;  // the IO thread began the layer's reads
  double end_s = 0;    // its last read completed (or failed)
  uint64_t bytes = 0;  // payload bytes of the layer
  bool ok = true;      // false: the load failed (acquire() throws StreamerIOError for it)
};
constexpr size_t kMaxLoadRecords = 1 << 16;  // the newest records kept; older ones are dropped

class Streamer {
 public:
  // Opens every file (StreamerIOError naming a missing one), allocates the buffers, starts the
  // IO thread. std::invalid_argument on bad options.
  explicit Streamer(StreamerOptions options);
  ~Streamer();  // close()
  Streamer(const Streamer&) = delete;
  Streamer& operator=(const Streamer&) = delete;

  int add_layer(const std::vector<ByteRange>& ranges);  // returns the layer id (0, 1, ...)
  void prefetch(int layer);
  // Blocks; StreamerIOError if the read failed. StreamerInterrupted when `check` returns true or
  // interrupt() was called: the request stays queued (acquire it again, or reset()).
  LayerView acquire(int layer, const WaitCheck& check = {});
  void release(int layer);
  // Waits for a read in flight to cancel. When `check` returns true meanwhile, the reset still
  // completes (its wait is one cancelled read), then throws StreamerInterrupted.
  void reset(const WaitCheck& check = {});
  // Makes acquire() throw StreamerInterrupted, on any thread, blocked now or called later, until the
  // next reset(): how one thread stops another that waits for a layer (e.g. after Ctrl-C).
  void interrupt();
  void close();

  // Fails the k-th read from now (0 = the next read issued) with errno `code`. Test hook.
  void inject_fault(uint64_t read_index, int code);

  // Whether the oldest request not yet acquired has finished loading (or failed), so that its
  // acquire() will not block. False when nothing is queued.
  bool next_ready() const;
  // Records of the loads with seq >= `since` that are still kept (the newest kMaxLoadRecords).
  std::vector<LoadRecord> loads_since(uint64_t since) const;
  uint64_t loads_finished() const;  // the seq the next finished load will get

  int num_layers() const;
  uint64_t layer_bytes(int layer) const;   // payload: sum of range lengths
  uint64_t layout_bytes(int layer) const;  // buffer bytes the layer occupies (aligned extents)
  StreamerStats stats() const;
  // fstat of each open file, in path order: the caller checks these are the files it validated.
  std::vector<FileIdentity> file_identities() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// The one source of the ring's sizes (Python's memory budget asks these too):
// Buffer bytes a layer of these ranges occupies (4096-aligned extents, adjacent ranges of a file merged).
uint64_t streamer_layout_bytes(const std::vector<ByteRange>& ranges);
// Bytes one buffer holds for StreamerOptions::buffer_bytes over `num_files` files: the payload
// capacity plus two aligned blocks per file (an extent's aligned head and tail), rounded up to 4096.
uint64_t streamer_buffer_capacity(uint64_t buffer_bytes, size_t num_files);
// A buffer_bytes (at least the layer's payload, and at least 1) whose capacity holds a layer of `ranges`.
uint64_t streamer_buffer_bytes_for(const std::vector<ByteRange>& ranges, size_t num_files);
// Memory a streamer allocates: num_buffers buffers of streamer_buffer_capacity() bytes.
uint64_t streamer_memory_bytes(uint64_t buffer_bytes, int num_buffers, size_t num_files);

// Seconds on the clock LoadRecord times use (std::chrono::steady_clock; CLOCK_MONOTONIC on Linux).
double streamer_clock_s();

// posix_fadvise(DONTNEED) over the whole file so the next read comes from storage.
void evict_from_page_cache(const std::string& path);

// Reads the whole file with O_DIRECT sequential pread of block_bytes (like dd iflag=direct);
// returns bytes per second. The baseline for streamer benchmarks.
double raw_direct_read_bytes_per_s(const std::string& path, uint64_t block_bytes);

// ---- backend interface, shared by streamer.cc, streamer_pread.cc and streamer_uring.cc ----
namespace streamer_detail {

struct ReadJob {
  int file = 0;
  int fd = -1;
  uint64_t offset = 0;    // file offset of the first byte to read
  uint64_t length = 0;    // bytes to read (a short read past need_end is fine: end of file)
  uint64_t need_end = 0;  // file offset up to which the bytes must exist
  uint8_t* dest = nullptr;
  int buffer = -1;  // index of the ring buffer dest lies in (for io_uring registered buffers)
};

// A piece of a ReadJob that one read call (pread or an io_uring SQE) covers.
struct Chunk {
  int job;          // index into the backend's job list
  uint64_t offset;  // file offset
  uint64_t length;  // bytes
  uint8_t* dest;
};

struct ReadFailure {
  int job = -1;         // -1: no failure
  uint64_t offset = 0;  // file offset of the failing read
  int code = 0;         // errno, ECANCELED when cancelled
  bool eof = false;     // end of file before need_end
  bool failed() const { return job >= 0; }
};

// What the streamer provides to a backend for every read.
class ReadHooks {
 public:
  virtual ~ReadHooks() = default;
  // Call before issuing a read of n bytes: waits for the bandwidth cap and counts the read.
  // Returns an errno to fail this read with (fault injection), else 0.
  virtual int before_read(uint64_t n) = 0;
  virtual void bytes_done(uint64_t n) = 0;
  virtual bool cancelled() const = 0;
};

class ReadBackend {
 public:
  virtual ~ReadBackend() = default;
  virtual const char* name() const = 0;
  // Offered once, before any read: the ring buffers. A backend may pin them (io_uring fixed buffers).
  virtual void use_buffers(const std::vector<uint8_t*>& buffers, uint64_t bytes) { (void)buffers, (void)bytes; }
  virtual bool buffers_registered() const { return false; }
  // Reads every job in pieces of at most chunk_bytes. On the first failure it stops issuing,
  // waits for reads in flight, and returns it.
  virtual ReadFailure read(const std::vector<ReadJob>& jobs, uint64_t chunk_bytes, ReadHooks& hooks) = 0;
};

// `workers` threads issue preads at once (1: strictly sequential).
std::unique_ptr<ReadBackend> make_pread_backend(int workers);
// Throws StreamerIOError(errno) when io_uring is refused (EPERM, ENOSYS, ...). Only with liburing.
std::unique_ptr<ReadBackend> make_uring_backend(int queue_depth);

}  // namespace streamer_detail
}  // namespace llmcad
