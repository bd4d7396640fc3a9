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
