"""Facts about this process's memory, read from the kernel: the peak and current resident set
(VmHWM, VmRSS in /proc/self/status), the memory cgroup this process belongs to and its limit (v1
``memory.limit_in_bytes``, v2 ``memory.max``), ``MemAvailable``, and handing freed heap back to the
kernel (glibc ``malloc_trim``).

Peak RSS comes from VmHWM, not ``getrusage().ru_maxrss``: a child inherits its parent's ru_maxrss
across fork/exec, so a process started by one holding 2 GB would report 2 GB whatever it used.

Imports nothing from llmcad: the budget, the engine, the CLI and the benchmarks all read it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

# cgroup v1 writes "no limit" as the largest page-aligned int64
_V1_UNLIMITED = 1 << 62


def _status_kib(field: str, pid="self") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int | None:
    """This process's peak resident set (VmHWM) in bytes; None where /proc is missing."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def rss_bytes() -> int | None:
    """This process's resident set now (VmRSS) in bytes; None where /proc is missing."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


_FLOOR = []


def runtime_floor() -> int:
    """The resident memory of this process before any model's weights load: measured once, by the
    first engine that loads (Python, torch and transformers imported, the tokenizer loaded), after the
    garbage is collected and the heap trimmed; later loads in the same process report the same figure.
    0 where /proc is missing."""
    if not _FLOOR:
        import gc

        gc.collect()
        malloc_trim()
        _FLOOR.append(rss_bytes() or 0)
    return _FLOOR[0]


def mem_available_bytes() -> int | None:
    """``MemAvailable`` from /proc/meminfo in bytes (what the kernel could give without swapping)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cgroup_dir(controller: str, pid="self") -> Path | None:
    """The directory of ``pid``'s cgroup for ``controller`` ("memory", "blkio"; "" for the v2 unified
    hierarchy), or None when that hierarchy is not mounted here.

    v1: the hierarchy mounted with that controller, at the path /proc/PID/cgroup names for it. v2
    (``controller=""`` or no v1 hierarchy has it): the cgroup2 mount at the ``0::`` path."""
    try:
        groups = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    paths = {}  # v1 controller or "" (v2) -> path inside the hierarchy
    for line in groups:
        _, names, path = line.split(":", 2)
        for name in (names.split(",") if names else [""]):
            paths[name] = path
    for line in mounts:
        fields = line.split()
        sep = fields.index("-")
        fstype, root, mount_point, options = fields[sep + 1], fields[3], fields[4], fields[sep + 3].split(",")
        if fstype == "cgroup" and controller and controller in options and controller in paths:
            return _inside(mount_point, root, paths[controller])
        if fstype == "cgroup2" and not controller and "" in paths:
            return _inside(mount_point, root, paths[""])
    if controller and "" in paths:  # not a v1 controller here: the unified hierarchy holds it, if any
        found = cgroup_dir("", pid)
        if found is not None and controller in (found / "cgroup.controllers").read_text().split():
            return found
    return None


def _inside(mount_point: str, root: str, path: str) -> Path:
    """A cgroup path as seen from a mount of the hierarchy at ``root`` (a container mounts its own)."""
    rel = os.path.relpath(path, root) if path.startswith(root) else path.lstrip("/")
    return Path(mount_point) / ("" if rel == "." else rel)


def cgroup_memory_limit(pid="self") -> int | None:
    """The tightest memory limit on ``pid``'s cgroup and its ancestors in bytes (v1
    ``memory.limit_in_bytes``, v2 ``memory.max``); None when there is none or no memory cgroup."""
    leaf = cgroup_dir("memory", pid)
    if leaf is None:
        return None
    limits = []
    for d in (leaf, *leaf.parents):
        for name in ("memory.limit_in_bytes", "memory.max"):
            try:
                text = (d / name).read_text().strip()
            except OSError:
                continue
            if text != "max" and int(text) < _V1_UNLIMITED:
                limits.append(int(text))
    return min(limits) if limits else None


def malloc_trim() -> bool:
    """Return the C heap's free pages to the kernel (glibc ``malloc_trim(0)``): after a large tensor is
    freed, the allocator may keep its pages and hold the resident set up. False where not glibc."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.malloc_trim(0))


MMAP_THRESHOLD = 4 << 20  # bytes: allocations this large are mapped and returned to the kernel on free
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_large_frees(threshold: int = MMAP_THRESHOLD) -> bool:
    """Make glibc map every allocation of ``threshold`` bytes or more and unmap it on free, at a fixed
    threshold. By default glibc raises the threshold (up to 32 MiB) each time a mapped block is
    freed, after which a pass's large intermediates come from the heaps of the threads that ran it
    and stay resident once freed (the target's pass runs on one thread, drafting on another, each
    with its own heap). False where not glibc."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))


_LIBC = []


def _libc():
    if not _LIBC:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            lib.malloc_trim.argtypes, lib.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
            lib.mallopt.argtypes, lib.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        except (OSError, AttributeError):
            lib = None
        _LIBC.append(lib)
    return _LIBC[0]
