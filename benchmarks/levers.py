"""Each lever's share of llmcad's gain, one removed at a time, on a real pair: ``llmcad generate`` with
every lever, then with one lever off (prompt lookup, the pipeline's provisional drafting, the cost rule,
the tree, the prompt's pass beside the draft's prefill), and target-only, in each setting; every run in its own process, prompts in turn.

    PYTHONPATH=python python benchmarks/levers.py --draft D --target T [--prompts 0:2] \
        [--max-new-tokens 64] [--settings native,300MB/s] [--lever 'NAME=FLAGS' ...] \
        [--out benchmarks/results/levers.json]

Settings: ``native`` is ``--memory-budget none`` (the target resident: compute only); a rate such as
``300MB/s`` is ``--memory-budget 2.5GiB --bandwidth-cap RATE``, the streamer capping its own reads
(emulated by llmcad, not by the kernel: a comparison of llmcad with itself). ``--lever NAME=FLAGS``
adds a row: the full run's flags plus FLAGS (e.g. ``'bf16 draft=--draft /models/draft-bf16'``).
Figures are ratios within this command: each row's tok/s against the full run's and target-only's.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from generate_runs import add_run_arguments, generate, humaneval_prompt_files, write_report
from llmcad.bench.e2e import git_commit

LEVERS = {"no prompt lookup": ["--no-prompt-lookup"], "no provisional drafting": ["--no-pipeline"],
          "paper's alpha rule, not the cost rule": ["--alpha-rule", "paper"], "chain, no tree": ["--mode", "chain"],
          "no prompt pass beside the draft": ["--no-prefill-beside"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(p)
    p.add_argument("--target-only-tokens", type=int, default=8,
                   help="tokens a prompt for target-only, whose tok/s does not depend on the count (default 8)")
    p.add_argument("--settings", default="native,300MB/s")
    p.add_argument("--streamed-budget", default="2.5GiB", help="--memory-budget of the rate settings")
    p.add_argument("--lever", action="append", default=[], metavar="NAME=FLAGS", help="another row to run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default=None)
    p.add_argument("--out", default="benchmarks/results/levers.json")
    return p.parse_args(argv)


def rows(args) -> dict:
    out = {"llmcad": [], **LEVERS}
    for spec in args.lever:
        name, sep, flags = spec.partition("=")
        if not sep or not name.strip():
            raise SystemExit(f"--lever {spec!r}: expected NAME=FLAGS")
        out[name.strip()] = shlex.split(flags)
    return {**out, "target-only": ["--mode", "target-only"]}


def setting_flags(args, setting: str) -> list:
    if setting == "native":
        return ["--memory-budget", "none"]
    return ["--memory-budget", args.streamed_budget, "--bandwidth-cap", setting]


def common_flags(args, name: str) -> list:
    tokens = args.target_only_tokens if name == "target-only" else args.max_new_tokens
    out = ["--draft", args.draft, "--target", args.target, "--max-new-tokens", str(tokens),
           "--threads", str(args.threads)]
    return out + (["--dtype", args.dtype] if args.dtype else [])


def run(args) -> list:
    results = []
    with humaneval_prompt_files(args.prompts) as prompts:
        for setting in [s.strip() for s in args.settings.split(",") if s.strip()]:
            for name, flags in rows(args).items():
                runs = [generate(common_flags(args, name) + setting_flags(args, setting) + flags, path,
                                 f"{setting} {name} {label}") for label, path in prompts]
                tokens, seconds = sum(len(r["tokens"]) for r in runs), sum(r["seconds"] for r in runs)
                results.append({"setting": setting, "row": name, "flags": flags, "runs": runs,
                                "tokens_per_s": tokens / seconds,
                                "tokens_per_pass": tokens / sum(r["target_passes"] for r in runs)})
                print(f"{setting} {name}: {results[-1]['tokens_per_s']:.2f} tok/s, "
                      f"{results[-1]['tokens_per_pass']:.2f} tokens a pass", file=sys.stderr, flush=True)
    return results


def add_ratios(results: list) -> None:
    """Each row's tok/s over its setting's full run and target-only; whether its tokens equal the full
    run's (greedy: every row but target-only's shorter runs must)."""
    for row in results:
        same = {r["row"]: r for r in results if r["setting"] == row["setting"]}
        full, base = same["llmcad"], same["target-only"]
        row["over_full"] = row["tokens_per_s"] / full["tokens_per_s"]
        row["over_target_only"] = row["tokens_per_s"] / base["tokens_per_s"]
        if row["row"] != "target-only":
            row["same_tokens_as_full"] = all(a["tokens"] == b["tokens"] for a, b in zip(row["runs"], full["runs"]))


def markdown(report: dict) -> str:
    lines = [f"Command: `{report['command']}` at {report['git_commit']}.", "",
             "| setting | row | tok/s | × target-only | × full llmcad | tokens a pass | same tokens |",
             "|---|---|--:|--:|--:|--:|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['setting']} | {r['row']} | {r['tokens_per_s']:.2f} | {r['over_target_only']:.2f} | "
                     f"{r['over_full']:.2f} | {r['tokens_per_pass']:.2f} | {r.get('same_tokens_as_full', '')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    report = {"command": "python benchmarks/levers.py " + shlex.join(sys.argv[1:] if argv is None else argv),
              "git_commit": git_commit()}  # read before the runs: the commit measured
    report["rows"] = run(args)
    add_ratios(report["rows"])
    write_report(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
