"""llmcad.memory: the process's own peak (VmHWM), its cgroup's limit, MemAvailable, malloc_trim."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

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


LARGE_FREES_CHILD = """
import ctypes, sys
from llmcad import LLMCad, memory
libc = memory._libc()
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
with LLMCad.from_pretrained(sys.argv[1], sys.argv[2], memory_budget="4GiB"):
    size, returned = 3 * memory.MMAP_THRESHOLD, []
    for _ in range(3):  # a freed mapped block would raise a dynamic threshold above `size`
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        before = memory.rss_bytes()
        libc.free(block)
        returned.append(before - memory.rss_bytes())
print(min(returned) / size)
"""


def test_a_budgeted_load_returns_large_frees_to_the_kernel(tiny_pair_dirs):
    """With a budget, a freed allocation of MMAP_THRESHOLD bytes or more leaves the resident set at
    once (glibc's threshold is fixed, not raised by earlier large frees). In a fresh process: free
    space an earlier test left in this process's heap would serve the allocation instead."""
    from child_cli import child_env

    if memory._libc() is None:
        pytest.skip("not glibc")
    dirs = tiny_pair_dirs("llama")
    out = subprocess.run([sys.executable, "-c", LARGE_FREES_CHILD, str(dirs["shared"]), str(dirs["target"])],
                         capture_output=True, text=True, env=child_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split()[-1]) >= 0.9
