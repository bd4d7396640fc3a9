"""The demo's first run inside a memory cgroup: a fresh model cache holding only the joined GGUF files
(what the demo extra's packages join to), so the run imports both models (prepare, in a child
process) and then answers under ``--memory-budget auto``, which reads the cgroup's limit.

    PYTHONPATH=python python benchmarks/demo_first_run.py --gguf-dir DIR [--limit 2.5GiB] [--max-new-tokens 32]

DIR holds qwen2.5-coder-0.5b-instruct.gguf and qwen2.5-coder-1.5b-instruct.gguf (their sha256 is
checked as on a real first run). Prints and writes one JSON object: the kernel's verdict, the
cgroup's peak charge (page cache included) against the limit, the exit status, the answer and the
last lines of stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from llmcad.bench import cgroups
from llmcad.bench.e2e import git_commit
from llmcad.models.fetch import DRAFT, TARGET
from llmcad.streaming.budget import parse_size


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf-dir", type=Path, required=True)
    p.add_argument("--limit", default="2.5GiB")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/demo_first_run.json"))
    args = p.parse_args()
    if (why := cgroups.available()) is not None:
        print(f"demo_first_run: cannot run: {why}", file=sys.stderr)
        return 2
    limit = parse_size(args.limit) // 4096 * 4096
    with tempfile.TemporaryDirectory(dir=args.gguf_dir.parent) as home:
        (Path(home) / "gguf").mkdir()
        for model in (DRAFT, TARGET):
            shutil.copyfile(args.gguf_dir / f"{model.name}.gguf", Path(home) / "gguf" / f"{model.name}.gguf")
        argv = [sys.executable, "-m", "llmcad.cli", "demo", "--max-new-tokens", str(args.max_new_tokens)]
        env = {**os.environ, "LLMCAD_HOME": home, "HF_HUB_OFFLINE": "1"}
        result = cgroups.run_limited(argv, memory_bytes=limit, env=env, timeout=3600)
    report = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "commit": git_commit(),
              "limit_bytes": limit, "memory_limit_read_back": result.memory_limit_bytes,
              "oom_killed": result.oom_killed, "returncode": result.returncode,
              "cgroup_peak_bytes": result.peak_bytes, "stdout_tail": result.stdout[-1500:].splitlines(),
              "stderr_tail": result.stderr[-2500:].splitlines()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if not k.endswith("_tail")}))
    print("\n".join(report["stdout_tail"] + report["stderr_tail"][-8:]))
    return 0 if result.returncode == 0 and not result.oom_killed else 1


if __name__ == "__main__":
    sys.exit(main())
