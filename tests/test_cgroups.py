"""llmcad.bench.cgroups: a command run in a fresh cgroup is held to its memory and read limits by the
kernel, and the cgroup is gone afterwards."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmcad.bench import cgroups
from llmcad.memory import cgroup_dir

pytestmark = pytest.mark.skipif(cgroups.available() is not None, reason=str(cgroups.available()))

MiB = 2**20
TOUCH = "x = bytearray({n}); x[::4096] = b'1' * len(x[::4096]); print('done')"


def _leftovers():
    return sorted(p.name for c in ("memory", "blkio") if (d := cgroup_dir(c)) for p in d.glob(f"llmcad-{os.getpid()}-*"))


def test_over_the_limit_is_oom_killed():
    result = cgroups.run_limited([sys.executable, "-c", TOUCH.format(n=400 * MiB)], memory_bytes=200 * MiB,
                                 timeout=120)
    assert result.returncode == -9 and result.oom_killed
    assert result.memory_limit_bytes == 200 * MiB
    assert result.peak_bytes is not None and result.peak_bytes <= 200 * MiB
    assert _leftovers() == []


def test_under_the_limit_completes_with_its_peak():
    result = cgroups.run_limited([sys.executable, "-c", TOUCH.format(n=100 * MiB)], memory_bytes=300 * MiB,
                                 timeout=120)
    assert (result.returncode, result.stdout.strip(), result.oom_killed) == (0, "done", False)
    assert 100 * MiB <= result.peak_bytes <= 300 * MiB
    assert _leftovers() == []


def test_read_bandwidth_is_throttled(tmp_path):
    if cgroups.available(io=True) is not None:
        pytest.skip(cgroups.available(io=True))
    data = tmp_path / "data"
    data.write_bytes(os.urandom(8 * MiB))
    try:
        cgroups._whole_disk(data)
    except Exception as exc:  # tmp on tmpfs: no disk to throttle
        pytest.skip(str(exc))
    read = ["dd", f"if={data}", "of=/dev/null", "bs=1M", "iflag=direct"]
    result = cgroups.run_limited(read, read_bps=4 * 10**6, read_path=data, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.read_bps_limit == 4 * 10**6
    assert result.elapsed_s >= 1.5  # 8 MiB at 4 MB/s: about 2 s (unthrottled: milliseconds)
    assert _leftovers() == []


def test_timeout_kills_the_command():
    result = cgroups.run_limited([sys.executable, "-c", "import time; time.sleep(60)"], memory_bytes=200 * MiB,
                                 timeout=1)
    assert result.timed_out and result.returncode == -9 and not result.oom_killed
    assert _leftovers() == []


def test_read_bps_needs_a_path():
    with pytest.raises(ValueError, match="read_path"):
        cgroups.run_limited(["true"], read_bps=1000)


def test_sigterm_kills_the_command_and_removes_its_cgroup(tmp_path):
    """``kill`` of a process running a limited command (a benchmark stopped by its job's timeout) leaves
    neither the command nor its cgroup behind, as with Ctrl-C."""
    started = tmp_path / "started"
    sleeper = f"import time; open({str(started)!r}, 'w').close(); time.sleep(120)"
    parent = (f"import sys; from llmcad.bench import cgroups; "
              f"cgroups.run_limited([sys.executable, '-c', {sleeper!r}], memory_bytes=200 * 2**20, timeout=300)")
    package_root = str(Path(cgroups.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", parent], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            exited = proc.poll() is not None
            assert not exited and time.monotonic() < deadline, proc.stderr.read() if exited else "slow"
            time.sleep(0.05)
        groups = [g for c in ("memory", "blkio") if (d := cgroup_dir(c)) for g in d.glob(f"llmcad-{proc.pid}-*")]
        assert groups
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        assert not any(g.exists() for g in groups)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
