"""The policy under load, on a real pair: ``llmcad generate`` in llmcad and chain mode, each prompt run
quiet and then beside a CPU-bound process pinned to one core (a Jetson's camera pipeline or ROS node),
each run in its own process; tokens a pass, tok/s, what the cost rule chose, and whether the tokens
equal the quiet run's.

    PYTHONPATH=python python benchmarks/contention.py --draft D --target T [--prompts 0:2] \
        [--max-new-tokens 64] [--modes llmcad,chain] [--threads auto,2] [--memory-budget none] \
        [--bandwidth-cap RATE] [--busy-core 0] [--out benchmarks/results/contention.json]

The runs of one prompt alternate quiet and busy, so a drift of the machine falls on both. Each figure
is a ratio within this command: busy against quiet for one row (a mode at one --threads setting),
llmcad against chain for one load and setting, and a setting against the first for one mode and load.
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
    p.add_argument("--bandwidth-cap", default=None, metavar="RATE", help="with a --memory-budget: the streamer "
                   "caps its own reads at RATE, e.g. 1.4GB/s (emulated by llmcad, the same for every mode; default: "
                   "uncapped)")
    p.add_argument("--threads", default="auto", help="comma-separated --threads settings, each a row per mode "
                   "(default: auto, llmcad's default: torch's less the cores other processes keep busy)")
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


def options(args, mode: str, threads: str) -> list:
    out = ["--draft", args.draft, "--target", args.target, "--max-new-tokens", str(args.max_new_tokens),
           "--mode", mode, "--memory-budget", args.memory_budget, "--threads", threads]
    out += ["--bandwidth-cap", args.bandwidth_cap] if args.bandwidth_cap else []
    return out + (["--dtype", args.dtype] if args.dtype else [])


def row_name(mode: str, threads: str) -> str:
    return f"{mode}, threads {threads}"


def run(args) -> dict:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    settings = [t.strip() for t in args.threads.split(",") if t.strip()]
    runs = []
    with humaneval_prompt_files(args.prompts) as prompts:
        for label, prompt_file in prompts:
            for mode in modes:
                for threads in settings:
                    name = f"{label} {row_name(mode, threads)}"
                    quiet = generate(options(args, mode, threads), prompt_file, name)
                    with busy_core(args.busy_core):
                        busy = generate(options(args, mode, threads), prompt_file, f"{name} (busy)")
                    runs.append({"prompt": label, "mode": mode, "threads": threads, "quiet": quiet, "busy": busy,
                                 "same_tokens": quiet["tokens"] == busy["tokens"]})
                    print(f"{name}: quiet {quiet['tokens_per_pass']:.2f} tokens a pass, {quiet['tokens_per_s']:.2f} "
                          f"tok/s; busy {busy['tokens_per_pass']:.2f}, {busy['tokens_per_s']:.2f} tok/s, "
                          f"{(busy['cpu_threads'] or {}).get('threads')} threads", file=sys.stderr, flush=True)
    return {"runs": runs, "summary": summarize(runs, modes, settings)}


def summarize(runs: list, modes: list, settings: list) -> dict:
    """Per row (mode, threads) and load: mean tokens a pass, total tok/s (tokens over seconds), the
    thread counts the runs ran; and the ratios."""
    out = {}
    for mode in modes:
        for threads in settings:
            mine = [r for r in runs if r["mode"] == mode and r["threads"] == threads]
            row = {}
            for load in ("quiet", "busy"):
                tokens = sum(len(r[load]["tokens"]) for r in mine)
                seconds = sum(r[load]["seconds"] for r in mine)
                ran = sorted({(r[load]["cpu_threads"] or {}).get("threads") for r in mine}, key=str)
                row[load] = {"tokens_per_pass": statistics.fmean(r[load]["tokens_per_pass"] for r in mine),
                             "tokens_per_s": tokens / seconds, "threads_ran": ran}
            row["busy_over_quiet_tokens_per_pass"] = row["busy"]["tokens_per_pass"] / row["quiet"]["tokens_per_pass"]
            row["busy_over_quiet_tokens_per_s"] = row["busy"]["tokens_per_s"] / row["quiet"]["tokens_per_s"]
            row["same_tokens"] = all(r["same_tokens"] for r in mine)
            out[row_name(mode, threads)] = row
    ratios = {}
    for threads in settings:
        llmcad, chain = out.get(row_name("llmcad", threads)), out.get(row_name("chain", threads))
        if llmcad and chain:
            ratios[f"llmcad over chain, threads {threads}"] = {
                load: llmcad[load]["tokens_per_s"] / chain[load]["tokens_per_s"] for load in ("quiet", "busy")}
    for mode in modes:
        for threads in settings[1:]:
            mine, first = out[row_name(mode, threads)], out[row_name(mode, settings[0])]
            ratios[f"{mode}: threads {threads} over threads {settings[0]}"] = {
                load: mine[load]["tokens_per_s"] / first[load]["tokens_per_s"] for load in ("quiet", "busy")}
    return {"rows": out, "ratios_tokens_per_s": ratios}


def markdown(report: dict) -> str:
    s = report["summary"]
    lines = [f"Command: `{report['command']}` at {report['git_commit']}, {report['cores']} cores; the busy process "
             f"spins on core {report['busy_core']}.", "",
             "| mode, --threads | load | threads ran | tokens a pass | tok/s |", "|---|---|--:|--:|--:|"]
    for name, row in s["rows"].items():
        for load in ("quiet", "busy"):
            ran = ", ".join(str(t) for t in row[load]["threads_ran"])
            lines.append(f"| {name} | {load} | {ran} | {row[load]['tokens_per_pass']:.2f} | "
                         f"{row[load]['tokens_per_s']:.2f} |")
    lines.append("")
    for name, row in s["rows"].items():
        lines.append(f"- {name}: busy keeps {row['busy_over_quiet_tokens_per_pass']:.2f}x its quiet tokens a pass "
                     f"and {row['busy_over_quiet_tokens_per_s']:.2f}x its tok/s; same tokens: {row['same_tokens']}")
    for name, ratio in s["ratios_tokens_per_s"].items():
        lines.append(f"- {name}, tok/s: {ratio['quiet']:.2f}x quiet, {ratio['busy']:.2f}x busy")
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
