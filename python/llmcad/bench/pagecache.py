"""Keeping weight files out of the page cache, so benchmarks read them from storage.

``evict(paths)`` drops files from the page cache once (the streamer's own eviction: fdatasync, then
posix_fadvise DONTNEED). ``Evictor`` keeps
them out while a row runs: it evicts before every target forward (a hook calls ``evict_now``), so a
peer that reads weights through buffered IO or mmap (accelerate's disk offload) is not served from
memory, and it asks util-linux ``fincore`` how many bytes of the files are cached. Evicting on a
timer instead (``interval_s``) also drops readahead pages before they are used, which makes a
reader fetch them twice: measured here, +50% bytes for accelerate's offload at 5 ms.

Part of llmcad.bench (tools): may import the whole package; nothing outside llmcad.bench imports it.
"""
from __future__ import annotations

import errno
import shutil
import subprocess
import threading
import time
from pathlib import Path

from llmcad.streaming.streamer import evict_from_page_cache

METHOD = "posix_fadvise(DONTNEED) before every target forward, checked with fincore"


def files_under(paths) -> list[Path]:
    """Regular files named in ``paths`` or found (recursively) in directories among them."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            out.append(p)
    return out


def evict(paths) -> None:
    """Drop every file in ``paths`` (files or directories) from the page cache."""
    _evict_files(files_under(paths))


def _evict_files(files) -> None:
    for f in files:
        try:
            evict_from_page_cache(f)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # a file that vanished (an offload folder being rewritten) needs none
                raise


def cached_bytes(paths) -> int | None:
    """Bytes of the files in ``paths`` resident in the page cache (util-linux fincore), None without it."""
    files = files_under(paths)
    if not files:
        return 0
    if shutil.which("fincore") is None:
        return None
    done = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES",
                           *map(str, files)], capture_output=True, text=True)
    if done.returncode != 0:
        return None
    return sum(int(line.split()[0]) for line in done.stdout.splitlines() if line.strip())


class Evictor:
    """Context manager that keeps ``paths`` out of the page cache while a row runs.

    ``evict_now()`` drops them at once (call it before each target forward: every pass then reads
    its weights from storage, and no pass re-reads what it already fetched). A background thread
    samples ``fincore`` every ``check_s`` and, with ``interval_s > 0``, also evicts every
    ``interval_s``. Pages a process has mapped (e.g. mmap-backed resident weights) cannot be dropped;
    ``max_cached_after_evict_bytes`` shows how many stayed right after an eviction.
    """

    def __init__(self, paths, interval_s: float = 0.0, check_s: float = 0.5, rescan_s: float = 0.5):
        self.paths = [Path(p) for p in paths]
        self.interval_s, self.check_s, self.rescan_s = interval_s, check_s, rescan_s
        self.ticks = 0  # background sweeps
        self.evictions = 0  # evict_now() calls
        self.max_cached_bytes = None  # largest fincore figure seen while running
        self.max_cached_after_evict_bytes = None
        self.fincore_samples = 0
        self._files: list = []
        self._lock = threading.Lock()
        self._last_check = 0.0
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self) -> "Evictor":
        self._rescan()
        self.evict_now()
        self._thread = threading.Thread(target=self._loop, name="llmcad-evictor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def evict_now(self) -> None:
        """Drop the files from the page cache now; sample fincore right after (at most every check_s)."""
        with self._lock:
            _evict_files(self._files)
        self.evictions += 1
        if time.monotonic() - self._last_check >= self.check_s:
            cached = self._sample()
            if cached is not None:
                self.max_cached_after_evict_bytes = max(self.max_cached_after_evict_bytes or 0, cached)

    def _loop(self) -> None:
        next_scan = next_sweep = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_scan:  # files may appear (offload folder) while a row runs
                self._rescan()
                next_scan = now + self.rescan_s
            if self.interval_s > 0 and now >= next_sweep:
                with self._lock:
                    _evict_files(self._files)
                self.ticks += 1
                next_sweep = now + self.interval_s
            if now - self._last_check >= self.check_s:
                self._sample()
            self._stop.wait(min(self.interval_s or self.check_s, self.check_s))

    def _rescan(self) -> None:
        files = files_under(self.paths)
        with self._lock:
            self._files = files

    def _sample(self):
        self._last_check = time.monotonic()
        cached = cached_bytes(self.paths)
        if cached is not None:
            self.fincore_samples += 1
            self.max_cached_bytes = max(self.max_cached_bytes or 0, cached)
        return cached

    def report(self) -> dict:
        method = METHOD + (f", and every {self.interval_s * 1e3:g} ms from a thread" if self.interval_s > 0 else "")
        return {"method": method, "evictions": self.evictions, "sweeps": self.ticks,
                "fincore_samples": self.fincore_samples, "max_cached_bytes": self.max_cached_bytes,
                "max_cached_after_evict_bytes": self.max_cached_after_evict_bytes}
