"""Weight streamer: reads layers (lists of byte ranges in files) into an N-buffer ring from a
background IO thread (C++, io_uring or pread, O_DIRECT where allowed).

Ordering (a ring, FIFO): ``prefetch(layer)`` queues a read; the IO thread loads queued layers in
order, at most ``num_buffers`` loaded or held at once. ``acquire(layer)`` must name the oldest
prefetched layer not yet acquired (when nothing is queued it queues the layer itself); it blocks with
the GIL released. ``release(layer)`` hands the buffer back for the next queued read. ``reset()``
drops everything queued, loaded or held (e.g. after the consumer raised midway).

Misuse raises ValueError naming the problem, never hangs: acquiring out of order, acquiring while
every buffer is held, releasing a layer that is not held (double release), unknown layer ids, use
after ``close()``. A failed read raises :class:`llmcad.errors.StreamerIOError` at ``acquire()``
(file, offset and errno text in the message, ``errno`` set); the streamer stays usable.

Timing: every finished load (not one cancelled by ``reset()``) is recorded by the C++ IO thread
with its start and end time; ``loads_since(seq)`` returns them as :class:`LoadRecord` on the
``time.perf_counter()`` clock, so a timeline needs no polling.

Views: ``LayerView.array`` and the tensors from ``LayerView.tensor`` share the buffer memory (no
copy). They are valid until ``release()``; after that the buffer is reused for another layer.

Part of llmcad.streaming: must not import llmcad.speculative, llmcad.models, llmcad.bench or the engine.
"""
from __future__ import annotations

import errno as _errno
import functools
import math
import numbers
import os
import time
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Iterable, Sequence

import numpy as np

from llmcad import _build
from llmcad.errors import StreamerIOError

__all__ = ["WeightStreamer", "LayerView", "LoadRecord", "evict_from_page_cache", "layout_bytes", "buffer_bytes_for",
           "memory_bytes", "check_bandwidth_cap", "MIN_BANDWIDTH_CAP"]

MIN_BANDWIDTH_CAP = 1e3  # bytes/s: a 1 MiB read already takes 17 minutes (and far below, the C++ clock overflows)


def check_bandwidth_cap(value, what: str = "bandwidth_cap"):
    """``value`` in bytes/s as a float (None: uncapped); ValueError naming ``what`` for anything but a
    finite number >= MIN_BANDWIDTH_CAP (a cap of 1e-9 is a unit mistake, not slow storage)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what}={value!r}: expected a positive number of bytes per second, e.g. 300e6 for 300 MB/s")
    if value < MIN_BANDWIDTH_CAP:
        raise ValueError(f"{what}={value!r}: below {MIN_BANDWIDTH_CAP:g} bytes/s no read ends in useful time; the cap "
                         "is in bytes per second, e.g. 300e6 for 300 MB/s")
    return float(value)


def _translate_io_errors(fn):
    """Re-raise the extension's StreamerIOError as llmcad.errors.StreamerIOError (errno kept)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _build._ext().StreamerIOError as exc:
            raise StreamerIOError(exc.errno, exc.strerror) from None

    return wrapper


def _ranges(ranges: Iterable[Sequence[int]]) -> list[tuple[int, int, int]]:
    out = []
    for i, r in enumerate(ranges):
        if len(r) != 3:
            raise ValueError(f"range {i} must be (file_index, offset, length), got {r!r}")
        out.append((int(r[0]), int(r[1]), int(r[2])))
    return out


@dataclass
class LayerView:
    """One acquired layer: a zero-copy view of its buffer and where each range starts in it."""

    layer_id: int
    array: np.ndarray  # uint8 over the bytes the layer occupies in the buffer
    offsets: list  # each range's start inside ``array``
    lengths: list  # each range's length in bytes
    ptr: int  # buffer address
    device_ptr: int = 0  # the same memory as a CUDA device address (pinned buffers), else 0

    def range_bytes(self, index: int) -> np.ndarray:
        """uint8 view of range ``index``."""
        start = self.offsets[index]
        return self.array[start : start + self.lengths[index]]

    def tensor(self, index: int, dtype, shape) -> "torch.Tensor":  # noqa: F821
        """Zero-copy torch view of range ``index`` as ``dtype`` with ``shape``.

        Raises ValueError when the range's length does not match ``shape`` and ``dtype``.
        """
        import torch

        shape = tuple(int(s) for s in shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        numel = 1
        for s in shape:
            numel *= s
        if numel * itemsize != self.lengths[index]:
            raise ValueError(
                f"range {index} holds {self.lengths[index]} bytes, but shape {shape} of {dtype} needs {numel * itemsize}"
            )
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self.range_bytes(index), dtype=dtype).view(shape)


@dataclass(frozen=True)
class LoadRecord:
    """One finished layer load, as the IO thread recorded it. Times: ``time.perf_counter()`` seconds."""

    seq: int  # 0, 1, ... in the order loads finished, over the streamer's life
    layer_id: int  # the id add_layer returned
    start_s: float  # the layer's first read was issued
    end_s: float  # its last read completed (or failed)
    bytes: int  # payload bytes of the layer
    ok: bool  # False: the load failed (its acquire raised StreamerIOError)


def _clock_offset() -> float:
    """perf_counter() minus the streamer's clock (0 where both are CLOCK_MONOTONIC, as on Linux)."""
    before = time.perf_counter()
    native = _build._ext().streamer_clock_s()
    return (before + time.perf_counter()) / 2 - native


class WeightStreamer:
    """Streams layers of byte ranges from ``paths`` through ``num_buffers`` buffers.

    Args:
        paths: files the ranges refer to by index (a single path is accepted too).
        buffer_bytes: payload capacity of ONE buffer; the streamer adds alignment slack (two
            4096-byte blocks per file), enough when each layer's ranges are contiguous within each
            file. ``add_layer`` raises ValueError when a layer does not fit; :func:`buffer_bytes_for`
            gives the size that fits a layer. Memory held: :func:`memory_bytes` (``memory_bytes``
            property), allocated once.
        num_buffers: buffers in the ring (layers loaded or held at once).
        backend: "auto" (io_uring when built and allowed, else pread; a refused io_uring gives one
            warning and ``stats()["warnings"]`` says so), "io_uring" (refused -> StreamerIOError) or
            "pread". ``LLMCAD_DISABLE_IO_URING=1`` in the environment makes io_uring count as refused.
        direct: try O_DIRECT; refused (e.g. tmpfs) -> buffered reads and one warning.
        queue_depth: reads in flight: io_uring queue entries; for pread, min(queue_depth, 8)
            threads each issue one read at a time.
        chunk_bytes: bytes per read (multiple of 4096).
        bandwidth_cap: bytes/s (token bucket) to emulate slower storage; None = uncapped.
        pinned: "auto" (cudaHostAlloc when a CUDA device is present), True or False.
    """

    @_translate_io_errors
    def __init__(
        self,
        paths,
        *,
        buffer_bytes: int,
        num_buffers: int = 2,
        backend: str = "auto",
        direct: bool = True,
        queue_depth: int = 64,
        chunk_bytes: int = 1 << 20,
        bandwidth_cap: float | None = None,
        pinned: bool | str = "auto",
    ):
        if isinstance(paths, (str, bytes, os.PathLike)):
            paths = [paths]
        paths = [os.fsdecode(p) for p in paths]
        if int(buffer_bytes) <= 0:
            raise ValueError(f"buffer_bytes must be > 0, got {buffer_bytes!r}")
        bandwidth_cap = check_bandwidth_cap(bandwidth_cap)
        pin = {True: "on", False: "off", "auto": "auto"}.get(pinned)
        if pin is None:
            raise ValueError(f"pinned must be 'auto', True or False, got {pinned!r}")
        self.paths = paths
        self._impl = _build._ext().Streamer(
            paths, int(buffer_bytes), int(num_buffers), backend, bool(direct), int(queue_depth), int(chunk_bytes),
            float(bandwidth_cap or 0.0), pin,
        )
        self._clock_offset = _clock_offset()
        self._warned = set()  # fallback kinds already warned about
        self._warn_new()

    # ---------------------------------------------------------------- ring
    def add_layer(self, ranges) -> int:
        """Registers a layer: ranges ``[(file_index, offset, length), ...]``; returns its id."""
        return self._impl.add_layer(_ranges(ranges))

    def prefetch(self, layer_id: int) -> None:
        """Queues a read of ``layer_id`` (FIFO)."""
        self._impl.prefetch(int(layer_id))

    @_translate_io_errors
    def acquire(self, layer_id: int) -> LayerView:
        """Blocks (GIL released) until ``layer_id`` is loaded; it must be next in prefetch order. The wait
        wakes every 50 ms to run signal handlers, so Ctrl-C raises KeyboardInterrupt here at any storage
        speed (the request stays queued: acquire again or reset()); :meth:`interrupt` from another
        thread raises KeyboardInterrupt too."""
        try:
            array, offsets, lengths, ptr, device_ptr = self._impl.acquire(int(layer_id))
        finally:
            self._warn_new()
        return LayerView(int(layer_id), array, list(offsets), list(lengths), int(ptr), int(device_ptr))

    def release(self, layer_id: int) -> None:
        """Frees the buffer of ``layer_id`` for the next queued read."""
        self._impl.release(int(layer_id))

    def reset(self) -> None:
        """Drops every queued, loaded and held layer (waits for a read in flight to cancel; a signal
        handler's exception is raised once the reset is complete)."""
        self._impl.reset()

    def interrupt(self) -> None:
        """Makes acquire() raise KeyboardInterrupt on any thread, blocked now or called later, until the
        next reset() (how the main thread stops a worker waiting for a layer)."""
        self._impl.interrupt()

    def inject_fault(self, read_index: int, errno: int = _errno.EIO) -> None:
        """Test hook: fails the ``read_index``-th read from now (0 = the next) with ``errno``."""
        self._impl.inject_fault(int(read_index), int(errno))

    def close(self) -> None:
        """Stops the IO thread and frees the buffers (views still alive keep their memory)."""
        if self._impl is not None:
            self._impl.close()

    def __enter__(self) -> "WeightStreamer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- facts
    def next_ready(self) -> bool:
        """Whether the next ``acquire()`` would return without waiting (its read finished or failed);
        False when nothing is queued."""
        return self._impl.next_ready()

    @property
    def loads_finished(self) -> int:
        """The ``seq`` the next finished load will get (a mark for :meth:`loads_since`)."""
        return self._impl.loads_finished()

    def loads_since(self, seq: int = 0) -> list:
        """:class:`LoadRecord` of every load with ``seq`` >= ``seq`` still kept (the newest 65536)."""
        off = self._clock_offset
        return [LoadRecord(q, layer, t0 + off, t1 + off, n, ok)
                for q, layer, t0, t1, n, ok in self._impl.loads_since(int(seq))]

    def stats(self) -> dict:
        """backend, direct, pinned, registered (io_uring fixed buffers), num_buffers, buffer_bytes, memory_bytes, bytes_read, reads,
        layers_loaded, errors, acquire_wait_s, io_busy_s, warnings."""
        return dict(self._impl.stats())

    def file_stats(self) -> list:
        """fstat of each file as the streamer opened it (not of the path now), in ``paths`` order:
        objects with ``st_dev``, ``st_ino``, ``st_size``, ``st_mtime_ns``, ``st_ctime_ns``, ``st_nlink``."""
        keys = ("st_dev", "st_ino", "st_size", "st_mtime_ns", "st_ctime_ns", "st_nlink")
        return [SimpleNamespace(**dict(zip(keys, values))) for values in self._impl.file_identities()]

    @property
    def backend(self) -> str:
        return self.stats()["backend"]

    @property
    def direct(self) -> bool:
        return self.stats()["direct"]

    @property
    def memory_bytes(self) -> int:
        return self.stats()["memory_bytes"]

    @property
    def bytes_read(self) -> int:
        return self.stats()["bytes_read"]

    @property
    def num_layers(self) -> int:
        return self._impl.num_layers()

    def layer_bytes(self, layer_id: int) -> int:
        """Payload bytes of a layer (sum of its range lengths)."""
        return self._impl.layer_bytes(int(layer_id))

    @property
    def max_layer_bytes(self) -> int:
        return max((self.layer_bytes(i) for i in range(self.num_layers)), default=0)

    # ---------------------------------------------------------------- internals
    def _warn_new(self) -> None:
        """At most one warning per streamer and kind of fallback: io_uring refused (-> pread) at
        construction, O_DIRECT refused (-> buffered reads) the first time a file falls back."""
        if len(self._warned) == 2:
            return
        found = self._impl.stats()["warnings"]
        new = [w for w in found if _fallback_kind(w) not in self._warned]
        if new:
            self._warned.update(_fallback_kind(w) for w in new)
            warnings.warn("llmcad streamer: " + "; ".join(new), RuntimeWarning, stacklevel=3)


def _fallback_kind(note: str) -> str:
    return "io_uring" if note.startswith("io_uring") else "O_DIRECT"


@_translate_io_errors
def evict_from_page_cache(path) -> None:
    """Drops ``path`` from the page cache (posix_fadvise DONTNEED) so the next read is cold."""
    _build._ext().evict_from_page_cache(str(path))


# Sizes of the ring, computed by the C++ streamer itself (the memory budget plans with these).
def layout_bytes(ranges) -> int:
    """Buffer bytes one layer of ``ranges`` occupies (4096-aligned extents)."""
    return _build._ext().streamer_layout_bytes(_ranges(ranges))


def buffer_bytes_for(ranges, num_files: int) -> int:
    """A ``buffer_bytes`` (at least the payload, at least 1) whose buffers hold a layer of ``ranges``
    in a streamer over ``num_files`` files."""
    return _build._ext().streamer_buffer_bytes_for(_ranges(ranges), int(num_files))


def memory_bytes(buffer_bytes: int, num_buffers: int, num_files: int) -> int:
    """Bytes a WeightStreamer(buffer_bytes=..., num_buffers=...) over ``num_files`` files allocates."""
    return _build._ext().streamer_memory_bytes(int(buffer_bytes), int(num_buffers), int(num_files))


@_translate_io_errors
def raw_direct_read_gbps(path, block_bytes: int = 4 << 20) -> float:
    """Baseline: O_DIRECT sequential read of the whole file in ``block_bytes`` blocks, in GB/s."""
    return _build._ext().raw_direct_read_bytes_per_s(str(path), int(block_bytes)) / 1e9
