"""One end-to-end comparison of drafts on the real pair: the bf16 draft, a packed draft and a pruned
output layer (on each draft), each through ``llmcad generate`` (a fresh process per run) on the same HumanEval prompts,
fp32 greedy (``--dtype``), so every run must give the same tokens.

    PYTHONPATH=python python benchmarks/draft_e2e.py --draft /work/pair/draft-tied \\
        --variant int8=/work/pair/draft-int8 --vocab 16384 --target /work/pair/target-bf16 --prompts 0:2

Each run: ``llmcad generate --draft D --target T --memory-budget none --mode llmcad --max-new-tokens 64
--json --threads 1 --dtype DTYPE --raw --file PROMPT [--draft-vocab N]``. Prints and writes one JSON
object: per run its tok/s and tokens per pass, and per configuration the ratios of their sums against
the first (the plain ``--draft``); ``same_tokens`` says whether every configuration gave the first's tokens.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from llmcad.bench.e2e import git_commit
from llmcad.bench.workloads import humaneval


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--draft", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--variant", action="append", default=[], metavar="NAME=DIR")
    p.add_argument("--vocab", action="append", default=[], metavar="N", help="also every draft with --draft-vocab N")
    p.add_argument("--prompts", default="0:2")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32", help="compute dtype (float32: every run must give the same "
                   "tokens; bfloat16, as the demo runs: tree passes may round apart)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/draft_e2e.json"))
    args = p.parse_args()
    drafts = [("bf16", args.draft)] + [tuple(v.split("=", 1)) for v in args.variant]
    configs = [(name, path, None) for name, path in drafts] + \
        [(f"{name}-vocab{n}", path, n) for n in args.vocab for name, path in drafts]
    commit = git_commit()  # the code measured, read before the runs
    texts, labels = humaneval(args.prompts)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(texts):
            prompt = Path(tmp) / f"prompt{i}.txt"
            prompt.write_text(text, encoding="utf-8")
            for name, draft, vocab in configs:  # configurations interleaved per prompt: drifting load hits all
                argv = ["llmcad", "generate", "--draft", draft, "--target", args.target, "--memory-budget", "none",
                        "--mode", "llmcad", "--max-new-tokens", str(args.max_new_tokens), "--json", "--threads",
                        "1", "--dtype", args.dtype, "--raw", "--file", str(prompt)]
                argv += ["--draft-vocab", str(vocab)] if vocab else []
                out = subprocess.run([sys.executable, "-m", "llmcad.cli", *argv[1:]], capture_output=True, text=True)
                if out.returncode:
                    print(out.stderr[-2000:], file=sys.stderr)
                    return out.returncode
                result = json.loads(out.stdout)
                stats = result["stats"]
                runs.append({"config": name, "prompt": labels[i], "command": shlex.join(argv), "tokens": result["tokens"],
                             "tokens_per_s": stats["tokens_per_s"], "tokens_per_pass": stats["tokens_per_pass"],
                             "generated": len(result["tokens"]), "draft_steps": stats.get("draft_steps"),
                             "target_passes": stats.get("target_passes")})
                print(f"  {labels[i]} {name}: {stats['tokens_per_s']:.3f} tok/s, {stats['tokens_per_pass']:.2f} "
                      "tokens/pass", file=sys.stderr, flush=True)
    report = {"command": shlex.join(["python", *sys.argv]), "commit": commit, "runs": runs,
              "summary": summary(runs, [c[0] for c in configs])}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["summary"], indent=1))
    return 0


def summary(runs: list, names: list) -> dict:
    """Per configuration: total tokens / total seconds and tokens per pass, and ratios against the first."""
    out = {}
    for name in names:
        mine = [r for r in runs if r["config"] == name]
        seconds = sum(r["generated"] / r["tokens_per_s"] for r in mine)
        passes = sum(r["target_passes"] for r in mine)
        out[name] = {"tokens_per_s": sum(r["generated"] for r in mine) / seconds,
                     "tokens_per_pass": sum(r["generated"] for r in mine) / passes,
                     "draft_steps": sum(r["draft_steps"] for r in mine),
                     "same_tokens": [r["tokens"] for r in mine] == [r["tokens"] for r in runs
                                                                    if r["config"] == names[0]]}
    base = out[names[0]]
    for s in out.values():
        s["tokens_per_s_ratio"] = s["tokens_per_s"] / base["tokens_per_s"]
        s["tokens_per_pass_ratio"] = s["tokens_per_pass"] / base["tokens_per_pass"]
    return out


if __name__ == "__main__":
    sys.exit(main())
