"""Timeline of one generation as Chrome trace-event JSON (Perfetto, chrome://tracing).

One process, one lane (``tid``) per activity, named by thread-name metadata events:
  IO              one span per streamed layer read (from the streamer's own load timings)
  target compute  one span per decoder layer the target runs, plus "io wait" spans while it is blocked
  draft           one span per draft forward ("draft" in a round, "provisional" during a verification)
  verify/commit   one span per target pass ("verify"), acceptance ("accept") and KV commit ("commit")
Spans are complete events (``"ph": "X"``) with ``ts``/``dur`` in microseconds from the trace's start.
"""
from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager

LANES = {"io": (1, "IO"), "target": (2, "target compute"), "draft": (3, "draft"), "verify": (4, "verify/commit")}
PID = 1


class Tracer:
    """Collects spans from any thread; ``write(path)`` saves them as Chrome trace-event JSON."""

    def __init__(self):
        self._start = time.perf_counter()
        self._events = []  # (lane, name, t0, t1, args); list.append is atomic under the GIL
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.perf_counter()

    def add(self, lane: str, name: str, t0: float, t1: float, **args) -> None:
        """A span on ``lane`` (a key of LANES) from perf_counter ``t0`` to ``t1`` (seconds)."""
        if lane not in LANES:
            raise ValueError(f"lane={lane!r}: expected one of {', '.join(LANES)}")
        with self._lock:
            self._events.append((lane, name, t0, max(t0, t1), args))

    @contextmanager
    def span(self, lane: str, name: str, **args):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(lane, name, t0, time.perf_counter(), **args)

    def spans(self, lane: str | None = None) -> list:
        """(lane, name, t0, t1, args) tuples, in start order."""
        with self._lock:
            events = list(self._events)
        return sorted((e for e in events if lane is None or e[0] == lane), key=lambda e: e[2])

    def to_chrome(self) -> dict:
        """The Chrome trace-event JSON object: thread names, then complete events in start order."""
        events = [{"ph": "M", "name": "process_name", "pid": PID, "tid": 0, "args": {"name": "llmcad"}}]
        for tid, label in LANES.values():
            events.append({"ph": "M", "name": "thread_name", "pid": PID, "tid": tid, "args": {"name": label}})
            events.append({"ph": "M", "name": "thread_sort_index", "pid": PID, "tid": tid,
                           "args": {"sort_index": tid}})
        for lane, name, t0, t1, args in self.spans():
            events.append({"ph": "X", "name": name, "cat": lane, "pid": PID, "tid": LANES[lane][0],
                           "ts": round((t0 - self._start) * 1e6, 3), "dur": round((t1 - t0) * 1e6, 3),
                           "args": args})
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def write(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_chrome(), f)


class IOProbe:
    """Turns a streamed target's load counters into IO-lane spans, one per layer read.

    The streamer reads on its own C++ thread and exposes cumulative counters (``layers_loaded``,
    ``errors``, ``io_busy_s``). A probe thread samples them every ``interval_s``; a load that
    finished between two samples becomes a span ending at the sample, lasting its share of the
    ``io_busy_s`` growth (exact when one load finishes per interval; the end is late by at most one
    interval). Loads are FIFO over the controller's streamed layers, so the k-th load since a
    reset is layer ``streamed[k % len(streamed)]``. Only runs while tracing.
    """

    def __init__(self, tracer: Tracer, controller, interval_s: float = 0.0005):
        self.tracer, self.controller, self.interval_s = tracer, controller, interval_s
        self._layers = list(controller.placement.streamed_layers)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="llmcad-io-probe", daemon=True)
        self._last = self._sample()
        self._base = self._prev_base = self._reset_base()

    def __enter__(self) -> "IOProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self._poll()  # loads finished since the last sample
        except Exception:  # noqa: BLE001 - the streamer closed: nothing more to observe
            pass

    def _sample(self):
        st = self.controller.streamer.stats()
        return int(st["layers_loaded"]) + int(st["errors"]), float(st["io_busy_s"])

    def _reset_base(self) -> int:
        return int(getattr(self.controller, "_loads_at_reset", 0))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._poll()
            except Exception:  # the streamer closed under us: nothing more to observe
                return

    def _poll(self) -> None:
        now = time.perf_counter()
        loads, busy = self._sample()
        done, spent = loads - self._last[0], busy - self._last[1]
        if done <= 0:
            return
        base = self._reset_base()
        if base != self._base:
            self._prev_base, self._base = self._base, base
        each = spent / done
        for j in range(done):
            g = self._last[0] + j  # this load's index among all the streamer's finished loads
            k = g - (self._base if g >= self._base else self._prev_base)  # ... since its ring's reset
            layer = self._layers[k % len(self._layers)] if self._layers else -1
            end = now - (done - 1 - j) * each
            self.tracer.add("io", f"read L{layer}", end - each, end, layer=layer)
        self._last = (loads, busy)
