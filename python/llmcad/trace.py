"""Timeline of one generation as Chrome trace-event JSON (Perfetto, chrome://tracing).

One process, one lane (``tid``) per activity, named by thread-name metadata events:
  IO              one span per streamed layer read (the streamer's per-load records)
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

    @property
    def start(self) -> float:
        """perf_counter() when the trace began (ts 0)."""
        return self._start

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


@contextmanager
def io_lane(tracer: Tracer, streamed):
    """Adds one IO-lane span per layer load of ``streamed`` (a StreamedTarget) that finishes inside
    the block, from the start and end times the streamer's IO thread recorded for it. A load that
    began before the trace did is cut at the trace's start."""
    mark = streamed.load_mark()
    try:
        yield
    finally:
        for load in streamed.loads_since(mark):
            name = f"read L{load.layer_id}" + ("" if load.ok else " (failed)")
            tracer.add("io", name, max(load.start_s, tracer.start), load.end_s, layer=load.layer_id)
