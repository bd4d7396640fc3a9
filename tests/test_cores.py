"""torch's compute threads chosen from the cores other processes leave free (llmcad.cores)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from llmcad import cores


class FakeClock:
    """psutil's per-CPU and per-process CPU seconds and the monotonic clock, set by the test."""

    def __init__(self, monkeypatch, cpus=4):
        self.now, self.own = 0.0, 0.0
        self.busy = [0.0] * cpus
        monkeypatch.setattr(cores.time, "monotonic", lambda: self.now)
        monkeypatch.setattr(cores.psutil, "cpu_times", lambda percpu: [self._cpu(b) for b in self.busy])
        monkeypatch.setattr(cores.psutil, "Process", lambda: SimpleNamespace(
            cpu_times=lambda: SimpleNamespace(user=self.own * 0.75, system=self.own * 0.25)))

    @staticmethod
    def _cpu(busy):  # busy seconds spread over the fields psutil reports; idle and iowait are free
        return SimpleNamespace(user=busy * 0.5, nice=0.0, system=busy * 0.25, irq=0.0, softirq=busy * 0.125,
                               steal=busy * 0.125, idle=100.0, iowait=7.0)


def test_other_processes_load_leaves_out_our_own_time_and_other_cpus(monkeypatch):
    clock = FakeClock(monkeypatch)
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: {1, 2}, raising=False)
    load = cores.CpuLoad()
    clock.now = 2.0
    clock.busy = [2.0, 2.0, 1.5, 2.0]  # CPUs 1 and 2 are ours: 3.5 busy seconds in 2 s
    clock.own = 1.5  # of which ours
    assert load.others() == pytest.approx(1.0)
    clock.own = 4.0  # more than the CPUs' busy time (a clock's rounding): never below zero
    assert load.others() == 0.0


def test_a_window_too_short_measures_nothing(monkeypatch):
    clock = FakeClock(monkeypatch)
    load = cores.CpuLoad()
    clock.now = cores.MIN_WINDOW_S / 2
    clock.busy = [1.0] * 4
    assert load.others() is None
    assert cores.busy_cores(None) == 0


@pytest.mark.parametrize("others, current, usable, want", [
    (None, 2, 2, 2), (0.0, 2, 2, 2), (0.4, 2, 2, 2), (0.6, 2, 2, 1), (1.0, 2, 2, 1), (2.0, 2, 2, 1),
    (1.0, 4, 8, 4), (5.2, 4, 8, 3), (3.0, 6, 6, 3), (0.0, 1, 4, 1)])
def test_threads_are_torch_s_less_the_busy_cores(monkeypatch, others, current, usable, want):
    monkeypatch.setattr(cores, "usable_cores", lambda: usable)
    assert cores.threads_for_load(others, current) == want


class FakeTorch:
    def __init__(self, monkeypatch, threads):
        self.threads = threads
        monkeypatch.setattr(cores.torch, "get_num_threads", lambda: self.threads)
        monkeypatch.setattr(cores.torch, "set_num_threads", self.set)

    def set(self, n):
        self.threads = n


def test_set_threads_auto_given_and_left_alone(monkeypatch):
    fake = FakeTorch(monkeypatch, 2)
    monkeypatch.setattr(cores, "usable_cores", lambda: 2)
    busy = SimpleNamespace(others=lambda: 1.1)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    chosen = cores.set_threads("auto", busy)
    assert fake.threads == 1
    assert chosen == {"threads": 1, "chosen": "auto", "usable_cores": 2, "other_load_cores": 1.1, "busy_cores": 1,
                      "draft_alone": 1}
    fake.threads = 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user fixed the count: auto keeps it, says why
    assert cores.set_threads("auto", busy)["chosen"] == "OMP_NUM_THREADS" and fake.threads == 2
    assert cores.set_threads(3, busy) == {"threads": 3, "chosen": "given", "usable_cores": 2,
                                          "other_load_cores": None, "busy_cores": 0, "draft_alone": 3}
    assert cores.set_threads(None, busy)["chosen"] == "torch's" and fake.threads == 3


@pytest.mark.parametrize("threads, draft_threads, omp, others, usable, want", [
    (1, "auto", False, 0.0, 2, 2),  # one thread beside the pass, both cores alone
    (1, "auto", False, 1.2, 2, 1),  # another process keeps a core busy: the free one
    (1, "auto", False, None, 4, 4),  # no load measured: every usable core
    (3, "auto", False, 0.0, 2, 3),  # never fewer than the pass's threads
    ("auto", "auto", False, 0.0, 2, 2),
    ("auto", 3, False, 0.0, 2, 3),  # given
    (1, 2, True, 0.0, 4, 2),  # given beats OMP_NUM_THREADS
    (1, "auto", True, 0.0, 4, 1),  # OMP_NUM_THREADS fixes the count: the pass's
    (None, "auto", False, 0.0, 4, 2)])  # threads left as torch has them: so are the draft's
def test_the_draft_alone_gets_the_free_cores(monkeypatch, threads, draft_threads, omp, others, usable, want):
    FakeTorch(monkeypatch, 2)
    monkeypatch.setattr(cores, "usable_cores", lambda: usable)
    if omp:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
    else:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    load = SimpleNamespace(others=lambda: others)
    assert cores.set_threads(threads, load, draft_threads)["draft_alone"] == want


def test_compute_threads_sets_them_for_the_block_and_back(monkeypatch):
    fake = FakeTorch(monkeypatch, 1)
    with cores.compute_threads(2):
        assert fake.threads == 2
    assert fake.threads == 1
    with pytest.raises(KeyError):
        with cores.compute_threads(3):
            raise KeyError("an error in the block")
    assert fake.threads == 1


def test_a_thread_that_has_run_keeps_its_own_count_when_another_changes_theirs():
    """What the engine relies on: the verify worker keeps its one thread while the draft, on the calling
    thread, runs with more (OpenMP's count is per thread once it has run an operation)."""
    import threading

    import torch

    before, seen = torch.get_num_threads(), {}
    started, switched = threading.Event(), threading.Event()

    def worker():
        torch.ones(64).add_(1)  # the first operation fixes this thread's count
        seen["first"] = torch.get_num_threads()
        started.set()
        switched.wait(10)
        seen["after"] = torch.get_num_threads()

    torch.set_num_threads(1)
    try:
        thread = threading.Thread(target=worker)
        thread.start()
        started.wait(10)
        with cores.compute_threads(2):
            switched.set()
            thread.join(10)
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == {"first": 1, "after": 1}


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2", "many"])
def test_bad_thread_counts_are_named(bad):
    with pytest.raises(ValueError, match="threads="):
        cores.check_threads(bad)
    with pytest.raises(ValueError, match=r"^draft_threads=.*: expected an int >= 1 or 'auto'$"):
        cores.check_threads(bad, "draft_threads", none=False)
    with pytest.raises(ValueError, match="draft_threads=None"):
        cores.check_threads(None, "draft_threads", none=False)


@pytest.mark.parametrize("text, want", [("auto", "auto"), (" AUTO ", "auto"), ("1", 1), ("12", 12)])
def test_the_command_line_count(text, want):
    assert cores.parse_threads(text) == want


@pytest.mark.parametrize("text", ["0", "-2", "x", "1.5", ""])
def test_a_bad_command_line_count_is_named(text):
    with pytest.raises(ValueError, match=f"--threads={text}: expected an int >= 1 or 'auto'"):
        cores.parse_threads(text)


def test_a_spinning_process_is_measured_as_a_busy_core():
    """Two processes spinning on this machine's cores: at least half a core of load, whatever else runs
    (on 2 cores, beside a test worker and its child, two spinners still get a core between them)."""
    code = "import time\nend = time.monotonic() + 5\nwhile time.monotonic() < end: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
    try:
        time.sleep(0.2)  # started
        load = cores.CpuLoad()
        time.sleep(1.0)
        others = load.others()
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    assert others is not None and others >= 0.6


def test_the_suite_shares_the_cores_among_its_workers_and_leaves_the_controller_alone(monkeypatch):
    """tests/conftest.py: a pytest-xdist worker pins its share of the cores; the controller sets nothing,
    since its workers inherit its environment (they would all run its count); a user's count stays."""
    import conftest

    threads = []
    monkeypatch.setattr(cores.torch, "set_num_threads", threads.append)
    monkeypatch.setattr(cores.torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(cores, "usable_cores", lambda: 2)
    controller = SimpleNamespace(option=SimpleNamespace(numprocesses="auto"))
    worker = SimpleNamespace(option=SimpleNamespace(numprocesses=2), workerinput={})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    conftest.pytest_configure(controller)
    assert "OMP_NUM_THREADS" not in os.environ and threads == []
    conftest.pytest_configure(worker)
    assert os.environ["OMP_NUM_THREADS"] == "1" and threads == [1]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    conftest.pytest_configure(worker)
    assert os.environ["OMP_NUM_THREADS"] == "3" and threads == [1]
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT")
    conftest.pytest_configure(SimpleNamespace(option=SimpleNamespace(numprocesses=None)))  # no xdist
    assert os.environ["OMP_NUM_THREADS"] == "2" and threads == [1, 2]
