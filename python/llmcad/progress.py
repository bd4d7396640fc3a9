"""What a long step is doing, on stderr: a line naming the step, a live elapsed-time counter while it
runs (on a terminal), and how long it took.

Counted work (downloads, tensors) shows tqdm bars of its own; a step that cannot count its work
shows this spinner instead, so nothing sits silent for more than a moment.
"""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager

from tqdm import tqdm


@contextmanager
def step(text: str, *, spinner: bool = True, file=None, interval: float = 0.2):
    """Show ``text`` while the block runs, then ``text: done in N s``.

    ``spinner=False``: only the line, for a step whose own progress bar follows it. Off a terminal
    (logs, pipes) the start and end lines are printed and nothing is redrawn.
    """
    file = file or sys.stderr
    started = time.perf_counter()
    live = spinner and _is_terminal(file)
    if not live:
        print(f"{text} ...", file=file, flush=True)
        yield
        print(f"{text}: done in {time.perf_counter() - started:.1f} s", file=file, flush=True)
        return
    bar = tqdm(total=None, desc=text, bar_format="{desc} {elapsed}", file=file, leave=False)
    stop = threading.Event()
    ticker = threading.Thread(target=_tick, args=(bar, stop, interval), daemon=True, name="llmcad-spinner")
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join()
        bar.close()
    print(f"{text}: done in {time.perf_counter() - started:.1f} s", file=file, flush=True)


def _tick(bar, stop: threading.Event, interval: float) -> None:
    marks = "|/-\\"
    desc, n = bar.desc, 0
    while not stop.wait(interval):
        n += 1
        bar.set_description_str(f"{desc} {marks[n % len(marks)]}", refresh=True)


def _is_terminal(file) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):
        return False


class FirstPassProgress:
    """Until a reply's first text, a live line on a terminal: ``reading the target: layer i/N`` moved by
    a streamed target's layer binds (a cold first pass reads every streamed layer, which takes seconds
    to minutes on slow storage), else ``reading the prompt``; its elapsed time ticks between binds.
    ``writer(write)`` wraps a text callback so that the first text clears the line; :meth:`close`
    clears it too (an empty reply, an error)."""

    def __init__(self, streamed=None, file=None, interval: float = 0.5):
        self._lock = threading.Lock()
        file = file or sys.stderr
        if streamed is None:
            self._bar = tqdm(total=None, desc="llmcad: reading the prompt", file=file, bar_format="{desc} {elapsed}",
                             leave=False)
            self._handle = None
        else:
            self._bar = tqdm(total=len(streamed.layers), desc="llmcad: reading the target", file=file,
                             bar_format="{desc}: layer {n_fmt}/{total_fmt} {elapsed}", leave=False)
            self._handle = streamed.watch_acquire(lambda i: None, self._bound)
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, args=(interval,), daemon=True, name="llmcad-first-pass")
        self._ticker.start()

    def _bound(self, layer: int) -> None:  # on the verification thread, before layer `layer` computes
        with self._lock:
            if self._bar is not None:
                self._bar.n = layer + 1
                self._bar.refresh()

    def _tick(self, interval: float) -> None:
        while not self._stop.wait(interval):
            with self._lock:
                if self._bar is not None:
                    self._bar.refresh()

    def writer(self, write):
        def first_text_clears(text: str) -> None:
            self.close()
            write(text)
        return first_text_clears

    def close(self) -> None:
        with self._lock:
            if self._bar is None:
                return
            if self._handle is not None:
                self._handle.remove()
            self._bar.close()
            self._bar = None
        self._stop.set()
        if self._ticker is not threading.current_thread():
            self._ticker.join()


class FirstPassLog:
    """The first pass's progress as log lines, for a server's log: ``report(layers_read, layers)`` at
    most every ``every_s`` seconds while the streamed target binds its layers, until :meth:`close`
    (the first text, or the end of the generation)."""

    def __init__(self, streamed, report, every_s: float = 2.0):
        self._lock = threading.Lock()
        self._report, self._every_s, self._layers = report, every_s, len(streamed.layers)
        self._next_report = time.monotonic() + every_s
        self._handle = streamed.watch_acquire(lambda i: None, self._bound)

    def _bound(self, layer: int) -> None:  # on the verification thread, before layer `layer` computes
        now = time.monotonic()
        with self._lock:
            if self._handle is None or now < self._next_report:
                return
            self._next_report = now + self._every_s
        self._report(layer + 1, self._layers)

    def close(self) -> None:
        with self._lock:
            if self._handle is not None:
                self._handle.remove()
                self._handle = None


def first_pass_progress(engine, write, *, live: bool):
    """(text callback, progress or None): ``write`` wrapped by a :class:`FirstPassProgress` when the
    line is ``live`` (a terminal), else ``write`` itself."""
    if not live:
        return write, None
    streamed = engine.streamed
    progress = FirstPassProgress(streamed if streamed is not None and streamed.placement.streamed_layers else None)
    return progress.writer(write), progress
