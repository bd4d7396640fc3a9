"""Running one row's job in its own process: plain, or in a fresh cgroup with the setting's kernel limits.

:func:`launch` writes the job, runs ``python -m llmcad.bench.rows`` (or, for a llama.cpp row,
``llama_row.py`` in the llama interpreter) and returns the raw record the child wrote, or one with
``error`` when it wrote none. Under a kernel profile the model files are evicted once first and the
child runs through :func:`llmcad.bench.cgroups.run_limited`; the record then holds the limits as read
back from the cgroup, the cgroup's peak and whether the OOM killer ended the row (``oom_killed``,
reported as the row's result, not as a crash of the benchmark).

Part of llmcad.bench (tools): may import the whole package; nothing outside llmcad.bench imports it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from llmcad.streaming.budget import format_size


def command(job: dict, job_path: Path, out_path: Path, llama_python: str | None) -> list:
    if job["row"]["runner"] == "llama":
        return [llama_python, str(Path(__file__).with_name("llama_row.py")), str(job_path), str(out_path)]
    return [sys.executable, "-m", "llmcad.bench.rows", str(job_path), str(out_path)]


def child_env() -> dict:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def launch(job: dict, setting, work: Path, index: int, *, timeout=None, llama_python=None, files=()) -> dict:
    """The raw record of ``job`` run in a child process under ``setting`` (a profiles.Setting)."""
    job_path, out_path = work / f"row-{index}.json", work / f"row-{index}.out.json"
    out_path.unlink(missing_ok=True)
    job_path.write_text(json.dumps(job))
    cmd = command(job, job_path, out_path, llama_python)
    limited = run_limited(cmd, setting, timeout, files) if setting.kernel else run_plain(cmd, timeout)
    record = json.loads(out_path.read_text()) if out_path.is_file() else {
        "name": job["row"]["name"], "setting": setting.name, "options": job["row"]["options"],
        "error": limited.pop("error", None) or "row wrote no result"}
    limited.pop("error", None)
    if limited.get("oom_killed"):
        record["error"] = (f"killed by the OOM killer at the memory limit {format_size(setting.memory_limit)} "
                           f"(cgroup peak {format_size(limited.get('cgroup_peak_bytes') or 0)})")
    record.update(limited)
    return record


def run_plain(cmd: list, timeout) -> dict:
    try:
        done = subprocess.run(cmd, env=child_env(), timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"row took longer than --row-timeout {timeout} s"}
    return {"error": f"row process exited with status {done.returncode}"} if done.returncode else {}


def run_limited(cmd: list, setting, timeout, files) -> dict:
    """Run ``cmd`` in a fresh cgroup with the setting's memory limit and read throttle (on the disk of
    ``files[0]``), the files evicted from the page cache first. Returns what goes into the record."""
    from llmcad.bench import cgroups
    from llmcad.bench.pagecache import evict

    evict(files)  # once, before the row: the cgroup charges whatever it caches to the row's limit
    result = cgroups.run_limited(cmd, memory_bytes=setting.memory_limit, read_bps=int(setting.read_limit),
                                 read_path=str(files[0]), timeout=timeout, env=child_env())
    sys.stderr.write(result.stderr)  # the row's progress, captured by run_limited
    out = {"memory_limit": setting.memory_limit, "read_limit": setting.read_limit, "enforced_by": setting.enforced_by,
           "kernel_limits": {"memory_bytes": result.memory_limit_bytes, "read_bps": result.read_bps_limit,
                             "cgroup_version": result.version, "read_device_of": str(files[0])},
           "cgroup_peak_bytes": result.peak_bytes, "oom_killed": result.oom_killed}
    if result.oom_killed or result.timed_out or result.returncode:
        out["stderr_tail"] = result.stderr.splitlines()[-5:]  # where the row was when it ended
    if result.timed_out:
        out["error"] = f"row took longer than --row-timeout {timeout} s"
    elif result.returncode:
        out["error"] = f"row process exited with status {result.returncode}"
    return out
