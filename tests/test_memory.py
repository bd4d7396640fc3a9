"""llmcad.memory: the process's own peak (VmHWM), its cgroup's limit, MemAvailable, malloc_trim."""
from __future__ import annotations

import json
import subprocess
import sys

from llmcad import memory

MiB = 2**20

CHILD = "import json; from llmcad.stats import peak_rss_bytes; print(json.dumps(peak_rss_bytes()))"
PARENT = """
import subprocess, sys
held = bytearray({n}); held[::4096] = b'1' * len(held[::4096])  # resident, not just reserved
print(subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, text=True, check=True).stdout)
"""


def test_peak_rss_is_this_process_not_the_parent_that_started_it():
    """A child inherits ru_maxrss across fork/exec: started by a process holding 600 MiB, a small
    process would report 600 MiB. VmHWM is its own."""
    code = PARENT.format(n=600 * MiB, child=CHILD)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    child_peak = json.loads(out.stdout.strip().splitlines()[-1])
    assert 10 * MiB < child_peak < 300 * MiB, child_peak


def test_peak_is_at_least_current():
    assert memory.peak_rss_bytes() >= memory.rss_bytes() > 0


def test_mem_available_and_cgroup_limit_are_sizes_or_none():
    assert memory.mem_available_bytes() > 0
    limit = memory.cgroup_memory_limit()
    assert limit is None or limit > 0


def test_malloc_trim_runs():
    assert memory.malloc_trim() in (True, False)
