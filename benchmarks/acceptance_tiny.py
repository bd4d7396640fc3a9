"""Acceptance of each mode on tiny random pairs whose draft is the target's first half of layers.

Prints one JSON line per mode: tokens per target pass, target passes per generated token, draft steps
per token, and the pass count relative to target-only, summed over families and prompts (greedy, fp32,
deterministic: counts, not timings). Every mode's output is checked against target-only's.

    PYTHONPATH=python python benchmarks/acceptance_tiny.py [--max-new-tokens 64] [--families llama,qwen2]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path


def _pair_models():
    """tests/pair_models.py (the tiny pair builders) as a module, without touching sys.path."""
    path = Path(__file__).resolve().parents[1] / "tests" / "pair_models.py"
    spec = importlib.util.spec_from_file_location("pair_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pair_models = _pair_models()

MODES = ("target-only", "chain", "tree", "llmcad")
PROMPTS = ("def add(a, b):", "The quick brown", "for i in range(10):", "import numpy as np")


def measure(families, max_new_tokens: int) -> list:
    from transformers.utils import logging

    from llmcad import LLMCad
    from llmcad.speculative.policy import make_policy
    from llmcad.models.loading import load_causal_lm

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    totals = {m: {"tokens": 0, "passes": 0, "draft_steps": 0} for m in MODES}
    tokenizer = pair_models.build_tokenizer()
    with tempfile.TemporaryDirectory() as root:
        for family in families:
            dirs = pair_models.build_family(Path(root), family, tokenizer)
            draft, target = load_causal_lm(dirs["shared"]), load_causal_lm(dirs["target"])
            for prompt in PROMPTS:
                reference = None
                for mode in MODES:
                    result = LLMCad(draft, target, tokenizer, make_policy(mode)).generate(prompt, max_new_tokens)
                    reference = reference or result.tokens
                    if result.tokens != reference:
                        raise AssertionError(f"{family} {mode}: output differs from target-only")
                    totals[mode]["tokens"] += len(result.tokens)
                    totals[mode]["passes"] += result.stats["target_passes"]
                    totals[mode]["draft_steps"] += result.stats["draft_steps"]
    base = totals["target-only"]["passes"]
    rows = []
    for mode in MODES:
        t = totals[mode]
        rows.append({
            "mode": mode, **make_policy(mode).describe(), "families": list(families), "prompts": len(PROMPTS),
            "generated_tokens": t["tokens"], "target_passes": t["passes"],
            "tokens_per_pass": round(t["tokens"] / t["passes"], 3),
            "passes_per_token": round(t["passes"] / t["tokens"], 3),
            "draft_steps_per_token": round(t["draft_steps"] / t["tokens"], 3),
            "passes_vs_target_only": round(t["passes"] / base, 3),
        })
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--families", default=",".join(pair_models.FAMILIES))
    args = p.parse_args(argv)
    for row in measure(args.families.split(","), args.max_new_tokens):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
