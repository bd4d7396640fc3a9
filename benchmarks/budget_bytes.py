"""Where the memory goes, old code against new at the memory the old code really occupied: the bytes a
streamed target pass reads, and the process's peak, each run inside a memory cgroup of ``--limit``.

    PYTHONPATH=python python benchmarks/budget_bytes.py --old-tree ../wt-old --old-draft D0 --old-budget 2.5GiB \
        --draft D --target T --limit 3.5GiB [--max-new-tokens 32]

Rows, in one run on one machine:
- old: ``llmcad generate --memory-budget OLD_BUDGET`` from the checkout ``--old-tree`` (its own
  python/ on PYTHONPATH), with its draft;
- new: ``llmcad generate --memory-budget LIMIT`` from this tree;
- new bench pass: ``llmcad bench pass --draft D --memory-budget LIMIT`` from this tree (outside the
  cgroup: it also holds the whole target resident as its compute baseline), the placement the engine
  runs, its cold pass timed against the raw read (io) of the same layers.
Each generate row reports the placement's bytes per pass, the bytes read per target pass, its peak RSS
(VmHWM) and the cgroup's peak against the limit.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from llmcad.bench import cgroups
from llmcad.bench.e2e import git_commit
from llmcad.streaming.budget import parse_size

PROMPT = "Write a Python function that checks whether a number is prime."
GiB = 2**30


def generate(tree: Path, draft: str, target: str, budget: str, limit: int, max_new: int, extra=()) -> dict:
    """``extra``: the old code's flags for the same prompt (it took --chat; the chat template is now the default)."""
    argv = [sys.executable, "-m", "llmcad.cli", "generate", "--draft", draft, "--target", target, "--prompt", PROMPT,
            "--max-new-tokens", str(max_new), "--memory-budget", budget, "--json", *extra]
    env = {**os.environ, "PYTHONPATH": str(tree / "python"), "OMP_NUM_THREADS": "1"}  # one thread in both
    result = cgroups.run_limited(argv, memory_bytes=limit, env=env, timeout=3600)
    row = {"tree": str(tree), "commit": git_commit(tree), "memory_budget": budget, "limit_bytes": limit,
           "oom_killed": result.oom_killed, "returncode": result.returncode, "cgroup_peak_bytes": result.peak_bytes}
    if result.returncode != 0:
        return {**row, "stderr": result.stderr[-800:]}
    stats = json.loads(result.stdout.strip().splitlines()[-1])["stats"]
    streamed = stats.get("streamed", {})
    return {**row, "peak_rss_bytes": stats["peak_rss_bytes"], "target_passes": stats["target_passes"],
            "bytes_read": stats["bytes_read"], "bytes_read_per_pass": stats["bytes_read"] / stats["target_passes"],
            "placement_bytes_per_pass": streamed.get("bytes_per_pass"), "streamed_layers": streamed.get("streamed_layers"),
            "resident_layers": streamed.get("resident_layers")}


def bench_pass(draft: str, target: str, budget: str) -> dict:
    """Not in the cgroup: bench pass also holds a resident copy of the whole target, its compute-alone
    baseline; the placement it times is the engine's at ``budget``."""
    argv = [sys.executable, "-m", "llmcad.cli", "bench", "pass", "--draft", draft, "--target", target,
            "--memory-budget", budget, "--json", "--repeats", "3"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return {"bench_pass": "failed", "stderr": proc.stderr[-800:]}
    return {"bench_pass": json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old-tree", type=Path, required=True, help="a checkout of the old code, its extension built")
    p.add_argument("--old-draft", required=True)
    p.add_argument("--old-budget", default="2.5GiB")
    p.add_argument("--draft", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--limit", default="3.5GiB")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/budget_bytes.json"))
    args = p.parse_args()
    if (why := cgroups.available()) is not None:
        print(f"budget_bytes: cannot run: {why}", file=sys.stderr)
        return 2
    limit = parse_size(args.limit) // 4096 * 4096
    here = Path(__file__).resolve().parents[1]
    report = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "commit": git_commit(here),
              "limit": args.limit, "rows": {}}
    report["rows"]["old"] = generate(args.old_tree.resolve(), args.old_draft, args.target, args.old_budget, limit,
                                     args.max_new_tokens, extra=("--chat",))
    report["rows"]["new"] = generate(here, args.draft, args.target, args.limit, limit, args.max_new_tokens)
    report["rows"]["new_bench_pass"] = bench_pass(args.draft, args.target, args.limit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for name, row in report["rows"].items():
        print(name, json.dumps({k: v for k, v in row.items() if k != "stderr"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
