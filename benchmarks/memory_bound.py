"""The memory budget as a bound, on a real pair: ``llmcad generate`` in every mode, each inside a fresh
memory cgroup whose limit is its ``--memory-budget``, at fixed budgets and at the least budget the
engine accepts plus 5%, compared token for token with the same mode run unbounded (no budget, no
cgroup).

    PYTHONPATH=python python benchmarks/memory_bound.py --draft D --target T \
        [--budgets 2.5GiB,3GiB,least+5%] [--modes target-only,chain,tree,llmcad] [--max-new-tokens 32] \
        [--out benchmarks/results/memory_bound.json]

Each row: the kernel's verdict (OOM-killed or not), exit status, the process's peak RSS (VmHWM) and
the cgroup's own peak (page cache included) against the limit, and whether the tokens equal the
unbounded run's. Rows are written as they finish; the report records the command and the commit.
Needs root and a writable memory cgroup (v1 or v2); says why not otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from llmcad.bench import cgroups
from llmcad.bench.e2e import git_commit
from llmcad.streaming.budget import parse_size

PROMPT = "Write a Python function that checks whether a number is prime."
MODES = ("target-only", "chain", "tree", "llmcad")
GiB = 2**30


def argv(args, mode: str, budget=None) -> list:
    out = [sys.executable, "-m", "llmcad.cli", "generate", "--draft", args.draft, "--target", args.target,
           "--prompt", PROMPT, "--max-new-tokens", str(args.max_new_tokens), "--mode", mode, "--json",
           "--threads", str(args.threads)]
    return out + ["--memory-budget", str(budget) if budget is not None else "none"]


def least_budget(args, mode: str) -> int:
    """The least budget the engine accepts for this run, from its own refusal of 1 byte."""
    proc = subprocess.run(argv(args, mode, 1), capture_output=True, text=True, timeout=900)
    found = re.search(r"needs at least [^(]*\((\d+) bytes\)", proc.stderr)
    if proc.returncode != 2 or found is None:
        raise SystemExit(f"expected a refusal naming the least budget, got exit {proc.returncode}: {proc.stderr[-800:]}")
    return int(found.group(1))


def unbounded(args, mode: str) -> dict:
    started = time.perf_counter()
    proc = subprocess.run(argv(args, mode), capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"unbounded {mode} failed: {proc.stderr[-800:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"mode": mode, "budget": None, "tokens": out["tokens"], "peak_rss_bytes": out["stats"]["peak_rss_bytes"],
            "seconds": round(time.perf_counter() - started, 1)}


def limited(args, mode: str, label: str, budget: int, reference: list) -> dict:
    budget = budget // 4096 * 4096  # the kernel keeps a limit in whole pages
    started = time.perf_counter()
    result = cgroups.run_limited(argv(args, mode, budget), memory_bytes=budget, timeout=3600)
    row = {"mode": mode, "budget": label, "limit_bytes": budget, "returncode": result.returncode,
           "oom_killed": result.oom_killed, "cgroup_peak_bytes": result.peak_bytes,
           "seconds": round(time.perf_counter() - started, 1)}
    if result.returncode == 0:
        out = json.loads(result.stdout.strip().splitlines()[-1])
        stats = out["stats"]
        row.update(peak_rss_bytes=stats["peak_rss_bytes"], runtime_floor_bytes=stats.get("runtime_floor_bytes"),
                   same_tokens=out["tokens"] == reference, tokens=len(out["tokens"]),
                   streamed_layers=stats.get("streamed", {}).get("streamed_layers"),
                   pass_rows=stats.get("pass_rows"), tokens_per_pass=stats.get("tokens_per_pass"))
    else:
        row["stderr"] = result.stderr[-600:]
    return row


def budgets(args, mode: str) -> list:
    out = []
    for item in args.budgets.split(","):
        item = item.strip()
        if item.startswith("least"):
            out.append((item, int(least_budget(args, mode) * 1.05)))
        else:
            out.append((item, parse_size(item)))
    return out


def table(rows: list) -> str:
    lines = ["| mode | budget | limit (GiB) | OOM | peak RSS (GiB) | cgroup peak (GiB) | same tokens as unbounded |",
             "|---|---|---:|---|---:|---:|---|"]
    for r in rows:
        if r["budget"] is None:
            continue
        peak = f"{r['peak_rss_bytes'] / GiB:.2f}" if r.get("peak_rss_bytes") else "-"
        group = f"{r['cgroup_peak_bytes'] / GiB:.2f}" if r.get("cgroup_peak_bytes") else "-"
        same = {True: "yes", False: "NO"}.get(r.get("same_tokens"), f"exit {r['returncode']}")
        lines.append(f"| {r['mode']} | {r['budget']} | {r['limit_bytes'] / GiB:.2f} | "
                     f"{'KILLED' if r['oom_killed'] else 'no'} | {peak} | {group} | {same} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--draft", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--budgets", default="2.5GiB,3GiB,least+5%")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/memory_bound.json"))
    args = p.parse_args()
    if (why := cgroups.available()) is not None:
        print(f"memory_bound: cannot run: {why}", file=sys.stderr)
        return 2
    report = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "commit": git_commit(),
              "prompt": PROMPT, "rows": []}
    for mode in args.modes.split(","):
        reference = unbounded(args, mode)
        report["rows"].append({k: v for k, v in reference.items() if k != "tokens"})
        for label, budget in budgets(args, mode):
            row = limited(args, mode, label, budget, reference["tokens"])
            report["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "stderr"}), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(f"`{report['command']}` at {report['commit']}\n\n{table(report['rows'])}\n")
    print(table(report["rows"]))
    return 0 if all(r.get("same_tokens", True) and not r.get("oom_killed") for r in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
