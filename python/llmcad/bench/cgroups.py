"""Running a command in a fresh cgroup with a memory limit and, optionally, a read-bandwidth limit on
the disk holding a path: the kernel, not llmcad, enforces the budget, as on a device.

``available()`` says why it cannot here (None when it can). ``run_limited(cmd, memory_bytes=...,
read_bps=..., read_path=...)`` creates the cgroup(s) below this process's own, writes the limits,
starts ``cmd`` already inside them (the child writes itself into ``cgroup.procs`` before exec), and
returns a :class:`LimitedResult`: exit status, output, whether the OOM killer struck, the cgroup's
peak charge, and the limits read back from the cgroup files. The cgroups are removed afterwards.
``started_limited(cmd, memory_bytes=...)`` does the same for a command that keeps running (a server):
a context manager yielding a :class:`LimitedProcess` to talk to; on exit everything in the cgroup
is killed and ``.verdict()`` says whether the OOM killer struck and the cgroup's peak.

cgroup v1 (``memory.limit_in_bytes``, ``blkio.throttle.read_bps_device``; swap is limited too where
``memory.memsw.limit_in_bytes`` exists) and v2 (``memory.max``, ``memory.swap.max``, ``io.max``).
The cgroup's charge counts page cache as well as the resident set, so ``peak_bytes`` is at least the
child's VmHWM; page cache is reclaimed under the limit rather than OOM-killed.

Part of llmcad.bench (tools): may import the whole package; nothing outside llmcad.bench imports it.
"""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from llmcad.memory import cgroup_dir

_names = itertools.count()


@dataclass
class LimitedResult:
    """``returncode`` (negative: killed by that signal); ``oom_killed``: the kernel's OOM killer ran in
    the cgroup; ``peak_bytes``: the cgroup's largest memory charge (None where the kernel does not
    keep it); ``memory_limit_bytes`` / ``read_bps_limit``: as read back from the cgroup files;
    ``version``: 1 or 2; ``timed_out``: killed after ``timeout``."""

    returncode: int
    stdout: str
    stderr: str
    oom_killed: bool
    peak_bytes: int | None
    memory_limit_bytes: int | None
    read_bps_limit: int | None
    version: int
    elapsed_s: float
    timed_out: bool = False


def available(io: bool = False) -> str | None:
    """None when a memory cgroup (and, with ``io``, a read-bandwidth cgroup) can be made here; else the
    reason it cannot, for a test's skip message."""
    if os.geteuid() != 0:
        return "not root: creating cgroups needs root"
    controllers = ("memory", "io") if io else ("memory",)
    for controller in controllers:
        try:
            _Group(controller).parent
        except _Unavailable as exc:
            return str(exc)
    return None


def run_limited(cmd, *, memory_bytes=None, read_bps=None, read_path=None, timeout=None, env=None,
                cwd=None) -> LimitedResult:
    """Run ``cmd`` (an argv list) in a fresh cgroup limited to ``memory_bytes`` and, with ``read_bps``,
    to that many bytes/s of reads from the block device holding ``read_path``. Output is captured as
    text. On ``timeout`` (seconds) every process in the cgroup is killed and ``timed_out`` is set.
    Raises RuntimeError when the cgroups cannot be made (see :func:`available`)."""
    if read_bps is not None and read_path is None:
        raise ValueError("read_bps needs read_path: the disk to throttle is the one holding it")
    if os.geteuid() != 0:
        raise RuntimeError("not root: creating cgroups needs root")
    groups = []
    try:
        with _unwinds_on_sigterm():
            mem = _Group("memory")
            groups.append(mem)
            mem.create()
            if memory_bytes is not None:
                mem.limit_memory(int(memory_bytes))
            io = None
            if read_bps is not None:
                io = mem if mem.version == 2 else _Group("io")
                if io is not mem:
                    groups.append(io)
                    io.create()
                io.limit_reads(_whole_disk(read_path), int(read_bps))
            return _run(cmd, groups, mem, io, timeout, env, cwd)
    except _Unavailable as exc:
        raise RuntimeError(str(exc)) from None
    finally:
        for group in groups:
            group.remove()


@dataclass
class LimitedProcess:
    """A command running in its own memory cgroup (see :func:`started_limited`)."""

    proc: subprocess.Popen
    _mem: "_Group"
    oom_killed: bool | None = None  # set once the command ended
    peak_bytes: int | None = None
    memory_limit_bytes: int | None = None

    def _finish(self) -> None:
        self._mem.kill_all()
        self.proc.wait()
        self.oom_killed = self._mem.oom_killed(self.proc.returncode)
        self.peak_bytes, self.memory_limit_bytes = self._mem.peak_bytes(), self._mem.memory_limit()


@contextmanager
def started_limited(cmd, *, memory_bytes: int, env=None, cwd=None, **popen):
    """``cmd`` started inside a fresh memory cgroup limited to ``memory_bytes`` (``popen``: Popen's
    stdout/stderr/text...); yields a :class:`LimitedProcess`. On exit every process in the cgroup is
    killed, the verdict (OOM kill, peak, limit) is filled in, and the cgroup is removed."""
    if os.geteuid() != 0:
        raise RuntimeError("not root: creating cgroups needs root")
    mem = _Group("memory")
    try:
        mem.create()
        mem.limit_memory(int(memory_bytes))
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, preexec_fn=_joiner([mem]), start_new_session=True, **popen)
    except _Unavailable as exc:
        mem.remove()
        raise RuntimeError(str(exc)) from None
    running = LimitedProcess(proc, mem)
    try:
        with _unwinds_on_sigterm():
            yield running
    finally:
        running._finish()
        mem.remove()


@contextmanager
def _unwinds_on_sigterm():
    """SIGTERM (``kill``, a job's timeout) ends this process through its ``finally`` blocks as Ctrl-C
    does, so the command is killed and its cgroups removed rather than left behind. Only the main thread
    may install a handler, and one installed by the caller is kept: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _joiner(groups):
    """A preexec_fn: the child writes itself into every group's cgroup.procs between fork and exec."""
    procs_files = [str(g.path / "cgroup.procs") for g in groups]

    def join_cgroups():
        for name in procs_files:
            with open(name, "w") as f:
                f.write(str(os.getpid()))
    return join_cgroups


def _run(cmd, groups, mem, io, timeout, env, cwd) -> LimitedResult:
    join_cgroups = _joiner(groups)

    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                            preexec_fn=join_cgroups, start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        for group in groups:
            group.kill_all()
        out, err = proc.communicate()
    elapsed = time.monotonic() - t0
    for group in groups:
        group.kill_all()  # anything the command left running would keep the cgroup alive
    return LimitedResult(returncode=proc.returncode, stdout=out, stderr=err, oom_killed=mem.oom_killed(proc.returncode),
                         peak_bytes=mem.peak_bytes(), memory_limit_bytes=mem.memory_limit(),
                         read_bps_limit=io.read_limit() if io is not None else None, version=mem.version,
                         elapsed_s=elapsed, timed_out=timed_out)


class _Unavailable(Exception):
    pass


class _Group:
    """One fresh cgroup below this process's own, for ``controller`` ("memory" or "io")."""

    def __init__(self, controller: str):
        self.controller = controller
        self.path = None
        self.version = None

    @property
    def parent(self) -> Path:
        v1 = cgroup_dir("blkio" if self.controller == "io" else "memory")
        if v1 is not None and (v1 / "cgroup.clone_children").exists():
            self.version = 1
            parent = v1
        else:
            parent = cgroup_dir("")
            if parent is None or self.controller not in _read(parent / "cgroup.controllers").split():
                raise _Unavailable(f"no {self.controller} cgroup controller here (neither a v1 hierarchy "
                                   "nor one enabled in this process's v2 cgroup)")
            self.version = 2
        if not os.access(parent, os.W_OK):
            raise _Unavailable(f"{parent}: not writable, cannot create a {self.controller} cgroup")
        return parent

    def create(self) -> None:
        parent = self.parent
        if self.version == 2:
            _enable_subtree(parent, ("memory", "io"))
        self.path = parent / f"llmcad-{os.getpid()}-{next(_names)}"
        self.path.mkdir()

    def limit_memory(self, nbytes: int) -> None:
        if self.version == 1:
            _write(self.path / "memory.limit_in_bytes", nbytes)
            if (self.path / "memory.memsw.limit_in_bytes").exists():  # no swapping around the limit
                _write(self.path / "memory.memsw.limit_in_bytes", nbytes)
        else:
            _write(self.path / "memory.max", nbytes)
            if (self.path / "memory.swap.max").exists():
                _write(self.path / "memory.swap.max", 0)

    def limit_reads(self, device: str, bps: int) -> None:
        if self.version == 1:
            _write(self.path / "blkio.throttle.read_bps_device", f"{device} {bps}")
        else:
            _write(self.path / "io.max", f"{device} rbps={bps}")

    def memory_limit(self) -> int | None:
        text = _read(self.path / ("memory.limit_in_bytes" if self.version == 1 else "memory.max")).strip()
        return None if text in ("", "max") or int(text) >= 1 << 62 else int(text)

    def read_limit(self) -> int | None:
        if self.version == 1:
            lines = _read(self.path / "blkio.throttle.read_bps_device").split()
            return int(lines[1]) if len(lines) >= 2 else None
        for field in _read(self.path / "io.max").split():
            if field.startswith("rbps=") and field != "rbps=max":
                return int(field[5:])
        return None

    def oom_killed(self, returncode: int) -> bool:
        if self.version == 1:
            fields = dict(line.split() for line in _read(self.path / "memory.oom_control").splitlines() if line)
            if "oom_kill" in fields:
                return int(fields["oom_kill"]) > 0
            # kernels before 4.13 do not count kills: the limit reached and a SIGKILL is one
            return int(_read(self.path / "memory.failcnt") or 0) > 0 and returncode == -signal.SIGKILL
        events = dict(line.split() for line in _read(self.path / "memory.events").splitlines() if line)
        return int(events.get("oom_kill", 0)) > 0

    def peak_bytes(self) -> int | None:
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        text = _read(self.path / name).strip()
        return int(text) if text else None

    def kill_all(self) -> None:
        if self.path is None:
            return
        for pid in _read(self.path / "cgroup.procs").split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass

    def remove(self) -> None:
        """rmdir once the cgroup's processes are gone (a killed process takes a moment to leave)."""
        if self.path is None or not self.path.exists():
            return
        for _ in range(100):
            self.kill_all()
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"could not remove cgroup {self.path}: processes still in it")


def _whole_disk(path) -> str:
    """``major:minor`` of the whole disk holding ``path`` (throttling applies to disks, not partitions)."""
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    if major == 0:
        raise _Unavailable(f"{path}: lies on a filesystem with no block device (tmpfs, overlay...); "
                           "cannot throttle its reads")
    sys_dev = Path(f"/sys/dev/block/{major}:{minor}")
    if (sys_dev / "partition").exists():
        return _read(sys_dev.resolve().parent / "dev").strip()
    return f"{major}:{minor}"


def _enable_subtree(parent: Path, controllers) -> None:
    """v2: a child cgroup gets a controller only when its parent enables it for its children."""
    enabled = _read(parent / "cgroup.subtree_control").split()
    available_here = _read(parent / "cgroup.controllers").split()
    for c in controllers:
        if c in available_here and c not in enabled:
            try:
                _write(parent / "cgroup.subtree_control", f"+{c}")
            except OSError as exc:
                raise _Unavailable(f"{parent}: cannot enable the {c} controller for child cgroups "
                                   f"({exc.strerror}; a v2 cgroup holding processes cannot)") from None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _write(path: Path, value) -> None:
    with open(path, "w") as f:
        f.write(str(value))
