"""The policy under load, on a real pair: ``llmcad generate`` in llmcad and chain mode, each prompt run
quiet and then beside a CPU-bound process pinned to one core (a Jetson's camera pipeline or ROS node),
each run in its own process; tokens a pass, tok/s, what the cost rule chose, and whether the tokens
equal the quiet run's.

    PYTHONPATH=python python benchmarks/contention.py --draft D --target T [--prompts 0:2] \
        [--max-new-tokens 64] [--modes llmcad,chain] [--memory-budget none] [--busy-core 0] \
        [--out benchmarks/results/contention.json]

The runs of one prompt alternate quiet and busy, so a drift of the machine falls on both. Each figure
is a ratio within this command: busy against quiet for one mode, llmcad against chain for one load.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
from contextlib import contextmanager

from generate_runs import add_run_arguments, generate, humaneval_prompt_files, write_report
from llmcad.bench.e2e import git_commit


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(p)
    p.add_argument("--modes", default="llmcad,chain")
    p.add_argument("--memory-budget", default="none", help="the runs' --memory-budget (default: none, so that "
                   "compute, which the busy core slows, is what a pass costs)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's)")
    p.add_argument("--threads", type=int, default=None, help="--threads of the runs (default: torch's)")
    p.add_argument("--busy-core", type=int, default=0, help="the core the CPU-bound process is pinned to")
    p.add_argument("--out", default="benchmarks/results/contention.json")
    return p.parse_args(argv)


@contextmanager
def busy_core(core: int):
    """A Python process spinning on ``core`` for the duration of the block."""
    spin = subprocess.Popen([sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{core}}})\nwhile True: pass"])
    try:
        yield
    finally:
        spin.kill()
        spin.wait()


def options(args, mode: str) -> list:
    out = ["--draft", args.draft, "--target", args.target, "--max-new-tokens", str(args.max_new_tokens),
           "--mode", mode, "--memory-budget", args.memory_budget]
    out += ["--dtype", args.dtype] if args.dtype else []
    return out + (["--threads", str(args.threads)] if args.threads else [])


def run(args) -> dict:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    runs = []
    with humaneval_prompt_files(args.prompts) as prompts:
        for label, prompt_file in prompts:
            for mode in modes:
                quiet = generate(options(args, mode), prompt_file, f"{label} {mode}")
                with busy_core(args.busy_core):
                    busy = generate(options(args, mode), prompt_file, f"{label} {mode} (busy)")
                runs.append({"prompt": label, "mode": mode, "quiet": quiet, "busy": busy,
                             "same_tokens": quiet["tokens"] == busy["tokens"]})
                print(f"{label} {mode}: quiet {quiet['tokens_per_pass']:.2f} tokens a pass, "
                      f"{quiet['tokens_per_s']:.2f} tok/s; busy {busy['tokens_per_pass']:.2f}, "
                      f"{busy['tokens_per_s']:.2f} tok/s", file=sys.stderr, flush=True)
    return {"runs": runs, "summary": summarize(runs, modes)}


def summarize(runs: list, modes: list) -> dict:
    """Per mode and load: mean tokens a pass and total tok/s (tokens over seconds), and the ratios."""
    out = {}
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        row = {}
        for load in ("quiet", "busy"):
            tokens = sum(len(r[load]["tokens"]) for r in mine)
            seconds = sum(r[load]["seconds"] for r in mine)
            row[load] = {"tokens_per_pass": statistics.fmean(r[load]["tokens_per_pass"] for r in mine),
                         "tokens_per_s": tokens / seconds}
        row["busy_over_quiet_tokens_per_pass"] = row["busy"]["tokens_per_pass"] / row["quiet"]["tokens_per_pass"]
        row["busy_over_quiet_tokens_per_s"] = row["busy"]["tokens_per_s"] / row["quiet"]["tokens_per_s"]
        row["same_tokens"] = all(r["same_tokens"] for r in mine)
        out[mode] = row
    if "llmcad" in out and "chain" in out:
        out["llmcad_over_chain_tokens_per_s"] = {load: out["llmcad"][load]["tokens_per_s"] /
                                                 out["chain"][load]["tokens_per_s"] for load in ("quiet", "busy")}
    return out


def markdown(report: dict) -> str:
    s = report["summary"]
    lines = [f"Command: `{report['command']}` at {report['git_commit']}, {report['cores']} cores; the busy process "
             f"spins on core {report['busy_core']}.", "",
             "| mode | load | tokens a pass | tok/s |", "|---|---|--:|--:|"]
    for mode, row in s.items():
        if mode == "llmcad_over_chain_tokens_per_s":
            continue
        for load in ("quiet", "busy"):
            lines.append(f"| {mode} | {load} | {row[load]['tokens_per_pass']:.2f} | {row[load]['tokens_per_s']:.2f} |")
    lines.append("")
    for mode, row in s.items():
        if mode != "llmcad_over_chain_tokens_per_s":
            lines.append(f"- {mode}: busy keeps {row['busy_over_quiet_tokens_per_pass']:.2f}x its quiet tokens a pass "
                         f"and {row['busy_over_quiet_tokens_per_s']:.2f}x its tok/s; same tokens: {row['same_tokens']}")
    if "llmcad_over_chain_tokens_per_s" in s:
        ratio = s["llmcad_over_chain_tokens_per_s"]
        lines.append(f"- llmcad over chain, tok/s: {ratio['quiet']:.2f}x quiet, {ratio['busy']:.2f}x busy")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if not 0 <= args.busy_core < (os.cpu_count() or 1):
        raise SystemExit(f"--busy-core {args.busy_core}: this machine has cores 0-{(os.cpu_count() or 1) - 1}")
    report = {"command": "python benchmarks/contention.py " + shlex.join(sys.argv[1:] if argv is None else argv),
              "git_commit": git_commit(), "cores": os.cpu_count(), "busy_core": args.busy_core}
    report.update(run(args))
    write_report(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
