"""How much of the provisional growth the next trees use, at a fixed provisional budget per pass.

Runs the ``llmcad`` mode on HumanEval problems with the pipeline in lockstep (each verification's first
IO wait lasts until the draft has grown ``--max-provisional-tokens`` nodes), so the count of provisional
nodes does not depend on the machine's load, and prints one JSON line per prompt and one for the total:
nodes grown in passes a later pass followed, how many of them started the next tree, the share, and the
tokens per pass. Counts, not timings; run it at two commits to compare provisional policies.

    PYTHONPATH=python python benchmarks/provisional_reuse.py --draft D --target T --memory-budget 4.5GiB \\
        --dtype float32 --bandwidth-cap 300e6 --prompts 0:2 --max-new-tokens 64 --max-provisional-tokens 48
"""
from __future__ import annotations

import argparse
import json


def followed_and_reused(result) -> tuple[int, int]:
    """(provisional nodes in passes a later pass followed, those that started the next tree)."""
    passes = result.trace[:-1]
    return sum(p.get("provisional", 0) for p in passes), sum(p.get("provisional_reused", 0) for p in passes)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--draft", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--memory-budget", required=True)
    p.add_argument("--dtype", default=None)
    p.add_argument("--bandwidth-cap", type=float, default=None, help="bytes/s")
    p.add_argument("--prompts", default="0:2", help="HumanEval problems START:END")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-provisional-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import torch

    from llmcad import LLMCad
    from llmcad.bench.workloads import humaneval

    torch.set_num_threads(args.threads)
    texts, labels = humaneval(args.prompts)
    streamer = {"streamer_options": {"bandwidth_cap": args.bandwidth_cap}} if args.bandwidth_cap else {}
    total = {"followed": 0, "reused": 0, "generated": 0, "passes": 0}
    with LLMCad.from_pretrained(args.draft, args.target, mode="llmcad", memory_budget=args.memory_budget,
                                dtype=args.dtype, max_provisional_tokens=args.max_provisional_tokens,
                                **streamer) as engine:
        engine.pipeline_lockstep = True
        for text, label in zip(texts, labels):
            result = engine.generate(text, max_new_tokens=args.max_new_tokens)
            followed, reused = followed_and_reused(result)
            row = {"followed": followed, "reused": reused, "generated": len(result.tokens),
                   "passes": result.stats["target_passes"]}
            total = {k: total[k] + row[k] for k in total}
            print(json.dumps({"prompt": label, **row, "reuse": reused / followed if followed else None}), flush=True)
    print(json.dumps({"prompt": "total", **total, "reuse": total["reused"] / total["followed"] if total["followed"]
                      else None, "tokens_per_pass": total["generated"] / total["passes"]}))


if __name__ == "__main__":
    main()
