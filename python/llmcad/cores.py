"""The CPU cores this process may use, how many of them other processes keep busy, and torch's
compute threads chosen from the free ones.

Why: torch's intra-op pool is OpenMP, whose threads meet at a barrier after each operation. With a
thread on a core that another process keeps busy, every barrier waits for that thread's time slice,
and the whole pool runs at the busy core's pace (measured on 2 cores, one of them spun by another
process: 2 threads ran a generation 0.63x as fast as 1 thread did).
"""
from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager

import psutil
import torch

MIN_WINDOW_S = 0.5  # a shorter window says more about a moment's noise than about the load
_BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq", "steal")  # per-CPU seconds not free to us


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS has one)."""
    return len(_usable_cpu_ids())


def _usable_cpu_ids() -> list:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


class CpuLoad:
    """The load other processes put on this process's usable cores, from construction to ``others()``:
    (the cores' busy seconds - this process's CPU seconds) / wall seconds, in cores (1.0: one core's
    worth). Run it across work the process does anyway (loading models) and it costs no waiting."""

    def __init__(self):
        self._start = _sample()

    def others(self) -> float | None:
        """Cores' worth of CPU time other processes used since construction; None where the window is
        under MIN_WINDOW_S or the OS reports no per-CPU times."""
        end = _sample()
        if self._start is None or end is None or end[0] - self._start[0] < MIN_WINDOW_S:
            return None
        wall = end[0] - self._start[0]
        busy = end[1] - self._start[1]
        own = end[2] - self._start[2]
        return max(0.0, (busy - own) / wall)


def _sample():
    """(monotonic s, busy s summed over the usable CPUs, this process's CPU s), or None."""
    try:
        per_cpu = psutil.cpu_times(percpu=True)
        own = psutil.Process().cpu_times()
    except (OSError, psutil.Error, NotImplementedError):
        return None
    ids = [i for i in _usable_cpu_ids() if i < len(per_cpu)] or range(len(per_cpu))
    busy = sum(getattr(per_cpu[i], f, 0.0) for i in ids for f in _BUSY_FIELDS)
    return time.monotonic(), busy, own.user + own.system


def busy_cores(others: float | None) -> int:
    """Whole cores that load keeps busy: a core counts from half its time."""
    return 0 if others is None else math.floor(others + 0.5)


def threads_for_load(others: float | None, current: int) -> int:
    """torch's compute threads beside that load: the current count, at most the cores left free, at
    least 1. Never more than ``current`` (torch's default is the physical cores: more would share them)."""
    return max(1, min(current, usable_cores() - busy_cores(others)))


def set_threads(threads, load: CpuLoad | None, draft_threads="auto") -> dict:
    """Apply ``threads`` (an int >= 1; "auto": fewer than torch's where other processes keep cores busy,
    unless OMP_NUM_THREADS fixes the count; None: torch's as it is) and say what was chosen on what.

    ``draft_threads``: the draft's threads when it drafts alone, no target pass in flight (an int >= 1;
    "auto": every usable core other processes leave free, at least ``threads``, unless OMP_NUM_THREADS
    or ``threads=None`` fixes the count); reported as ``draft_alone``, applied by :func:`compute_threads`."""
    measure = load is not None and "auto" in (threads, draft_threads)
    others = load.others() if measure else None
    fixed = bool(os.environ.get("OMP_NUM_THREADS"))
    if threads == "auto" and not fixed:
        torch.set_num_threads(threads_for_load(others, torch.get_num_threads()))
        source = "auto"
    elif isinstance(threads, int) and not isinstance(threads, bool):
        torch.set_num_threads(threads)
        source = "given"
    else:
        source = "OMP_NUM_THREADS" if threads == "auto" else "torch's"
    chosen = torch.get_num_threads()
    if isinstance(draft_threads, int) and not isinstance(draft_threads, bool):
        alone = draft_threads
    elif draft_threads == "auto" and not fixed and threads is not None:
        alone = max(chosen, usable_cores() - busy_cores(others))
    else:
        alone = chosen
    mine = others if threads == "auto" else None  # the load as the count was chosen on it
    return {"threads": chosen, "chosen": source, "usable_cores": usable_cores(),
            "other_load_cores": None if mine is None else round(mine, 2), "busy_cores": busy_cores(mine),
            "draft_alone": alone}


@contextmanager
def compute_threads(n: int):
    """torch's compute threads set to ``n`` for the block, then back. Per calling thread: OpenMP keeps
    a count for each thread that has run an operation, so a worker already running passes keeps its own."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_threads(threads, name: str = "threads", none: bool = True) -> None:
    """ValueError naming ``name`` unless ``threads`` is an int >= 1, "auto" or (``none``) None."""
    if (none and threads is None) or threads == "auto":
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        accepted = "an int >= 1, 'auto' or None" if none else "an int >= 1 or 'auto'"
        raise ValueError(f"{name}={threads!r}: expected {accepted}")


def parse_threads(text, name: str = "--threads"):
    """A command line's thread count: "auto" or an int >= 1 (ValueError naming ``name`` otherwise)."""
    if isinstance(text, str) and text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        raise ValueError(f"{name}={text}: expected an int >= 1 or 'auto'")
    return value
