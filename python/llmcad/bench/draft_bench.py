"""``llmcad bench draft``: what a draft forward costs and how often the draft agrees with the target, for a
draft, its packed copies (``--variant int8=DIR``) and pruned output layers (``--draft-vocab N,...``).

For each configuration (draft x vocabulary):
- ``forward_s``: median seconds of one draft forward of R rows (the drafter's own call: the decoder over
  R new tokens after a KV cache of ``--kv-length`` positions, then its output layer and each row's top
  tokens), for R in ``--rows``; after ``--warmup`` unmeasured forwards, ``--repeats`` measured ones; the
  tokens are drawn with ``--seed``.
- ``agreement``: over the workload's teacher-forced tokens (each prompt, then ``--new-tokens`` of the
  target's own greedy continuation), the share of positions where the draft's top-1 token (among the
  tokens it may propose) is the target's top-1; ``agreement_generated``: the same over the continuations.
Every figure also appears as a ratio against the first configuration, the ``--draft`` with its full
vocabulary, measured in the same command (``speedup`` = its time / this time; ``agreement_ratio`` = this
agreement / its agreement). The machine may be shared: only ratios within one command compare.

Part of llmcad.bench (tools): may import the whole package; nothing outside llmcad.bench imports it.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch

from llmcad.bench import workloads
from llmcad.bench.pass_variants import _commit, _label, _parse_variant

DEFAULT_ROWS = "1,2,4,8,16,32"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft", required=True, help="the baseline draft (e.g. the bf16 one): a prepared directory")
    p.add_argument("--target", required=True, help="the target whose top-1 tokens the drafts are compared with")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=DIR", help="also this draft (e.g. "
                   "int8=DIR from prepare --quantize int8), repeatable")
    p.add_argument("--draft-vocab", default="none", metavar="N,...", help="also each draft with its output layer "
                   "cut to N tokens (llmcad.models.vocab), e.g. 32768,16384 (default: none)")
    p.add_argument("--rows", default=DEFAULT_ROWS, help="rows per timed forward")
    p.add_argument("--kv-length", type=int, default=384, help="KV positions before each timed forward (a "
                   "prompt and its answer so far)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured forwards per row count")
    p.add_argument("--repeats", type=int, default=5, help="measured forwards per row count (median)")
    p.add_argument("--seed", type=int, default=0, help="seed of the timed forwards' tokens")
    p.add_argument("--new-tokens", type=int, default=32, help="target greedy tokens after each prompt, "
                   "teacher-forced too")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="compute dtype of both models (default: the checkpoints')")
    p.add_argument("--threads", type=int, default=None, help="torch's compute threads (default: torch's)")
    p.add_argument("--tiny", action="store_true", help="the built-in tiny prompts (tests) instead of HumanEval")
    workloads.add_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from llmcad.models.catalog import resolve
    from llmcad.models.vocab import parse_draft_vocab

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = _ints(args.rows, "--rows")
    vocabs = [None] + [n for n in (parse_draft_vocab(v, "--draft-vocab") for v in args.draft_vocab.split(",")) if n]
    drafts = [(_label(resolve(args.draft)), resolve(args.draft))] + \
        [(name, resolve(path)) for name, path in map(_parse_variant, args.variant)]
    target = resolve(args.target)
    sequences, generated_from = teacher_forced(target, workloads.load(args, target), args.new_tokens, args.dtype)
    records = []
    for name, path in drafts:
        for n in vocabs:
            record = measure_draft(path, target, n, sequences, generated_from, rows, args)
            record.update(draft=name, path=str(path))
            records.append(record)
            print(f"  {name} vocab {n or 'full'}: 1 row {record['forward_s'][str(rows[0])]:.4f}s, agreement "
                  f"{record['agreement']:.3f}", file=sys.stderr, flush=True)
    add_ratios(records)
    report = {"command": _command(), "commit": _commit(), "threads": torch.get_num_threads(),
              "kv_length": args.kv_length, "rows": rows, "repeats": args.repeats, "warmup": args.warmup,
              "seed": args.seed, "new_tokens": args.new_tokens, "dtype": args.dtype, "target": str(target),
              "positions": sum(len(seq) - 1 for seq, _ in sequences), "records": records}
    print(json.dumps(report, indent=1) if args.json else markdown(report))
    return 0


def teacher_forced(target, loaded: list, new_tokens: int, dtype) -> tuple[list, list]:
    """(token sequences: each prompt then the target's greedy continuation, where each continuation starts)."""
    from llmcad.models.loading import load_causal_lm

    model = load_causal_lm(target, dtype=dtype)
    sequences, starts = [], []
    for workload in loaded:
        for ids in workload["prompt_ids"]:
            t = torch.tensor([ids])
            with torch.inference_mode():
                out = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=new_tokens,
                                     do_sample=False) if new_tokens else t
            sequences.append(out[0].tolist())
            starts.append(len(ids))
    tops = [top1(model, seq, None) for seq in sequences]
    del model
    gc.collect()
    return list(zip(sequences, tops)), starts


def top1(model, seq: list, vocab_ids) -> torch.Tensor:
    """The model's top-1 token after each prefix of ``seq`` (one causal forward), int64 [len(seq)]."""
    from transformers import DynamicCache

    from llmcad.speculative.forward import causal_rows, forward_with_mask

    weight = model.get_input_embeddings().weight
    mask = causal_rows(0, len(seq), len(seq), weight.dtype, weight.device)
    logits = forward_with_mask(model, DynamicCache(), seq, torch.arange(len(seq)), mask)
    rows = torch.cat([chunk.argmax(-1) for _, chunk in logits.chunks()]).cpu()
    return rows if vocab_ids is None else vocab_ids[rows]


def measure_draft(path, target, n, sequences, generated_from, rows, args) -> dict:
    """One configuration: its weights' bytes, forward seconds by rows, agreement with the target."""
    from llmcad.models.loading import load_causal_lm, load_tokenizer, prune_draft_vocab
    from llmcad.streaming.budget import module_bytes

    model = load_causal_lm(path, dtype=args.dtype)
    ids = prune_draft_vocab(model, load_tokenizer(path), n, target)
    record = {"draft_vocab": n, "quantize": _scheme(path), "weight_bytes": module_bytes(model),
              "forward_s": forward_seconds(model, ids, rows, args)}
    agree = total = agree_gen = total_gen = 0
    for (seq, target_top), start in zip(sequences, generated_from):
        same = (top1(model, seq, ids) == target_top)[:-1]  # the last position predicts past the sequence
        agree, total = agree + int(same.sum()), total + len(same)
        agree_gen, total_gen = agree_gen + int(same[start - 1:].sum()), total_gen + len(same[start - 1:])
    record.update(agreement=agree / max(total, 1), agreement_generated=agree_gen / total_gen if total_gen else None)
    del model
    gc.collect()
    return record


def forward_seconds(model, vocab_ids, rows: list, args) -> dict:
    """{rows: median seconds} of the drafter's forward of that many rows after ``args.kv_length`` keys."""
    from transformers import DynamicCache

    from llmcad.speculative.draft import TreeDrafter
    from llmcad.speculative.forward import forward_with_mask, prefill

    generator = torch.Generator().manual_seed(args.seed)
    vocab = model.get_input_embeddings().weight.shape[0]
    cache = DynamicCache()
    prefill(model, cache, torch.randint(0, vocab, (args.kv_length,), generator=generator).tolist(), 64)
    drafter = TreeDrafter(model, [0], vocab_ids=vocab_ids)  # its top-token selection, as it runs it
    dtype = model.get_input_embeddings().weight.dtype
    out = {}
    for r in rows:
        mask = torch.zeros((1, 1, r, args.kv_length + r), dtype=dtype)
        mask[0, 0, :, args.kv_length:] = float("-inf")
        mask[0, 0, :, args.kv_length:].fill_diagonal_(0)  # siblings: each row sees the prefix and itself
        positions = torch.full((r,), args.kv_length)
        times = []
        for i in range(args.warmup + args.repeats):
            tokens = torch.randint(0, vocab, (r,), generator=generator).tolist()
            t0 = time.perf_counter()
            drafter._top(forward_with_mask(model, cache, tokens, positions, mask))
            times.append(time.perf_counter() - t0)
            cache.crop(-r)
        out[str(r)] = statistics.median(times[args.warmup:])
    return out


def add_ratios(records: list) -> None:
    """``speedup`` by rows (the baseline's seconds / these) and ``agreement_ratio``, against the first."""
    base = records[0]
    for r in records:
        r["speedup"] = {k: base["forward_s"][k] / v for k, v in r["forward_s"].items()}
        r["agreement_ratio"] = r["agreement"] / base["agreement"] if base["agreement"] else None
        r["bytes_ratio"] = r["weight_bytes"] / base["weight_bytes"]


def markdown(report: dict) -> str:
    rows = [str(r) for r in report["rows"]]
    head = " | ".join(f"{r} row{'s' if r != '1' else ''} ms (x)" for r in rows)
    lines = [f"`{report['command']}` (commit {report['commit']}, {report['threads']} threads, KV length "
             f"{report['kv_length']}, median of {report['repeats']}; agreement over {report['positions']} "
             "teacher-forced positions)", "",
             f"| draft | vocab | MiB | {head} | agreement (x) | agreement on generated |",
             "|---|---|---|" + "---|" * len(rows) + "---|---|"]
    for r in report["records"]:
        times = " | ".join(f"{1e3 * r['forward_s'][k]:.1f} ({r['speedup'][k]:.2f}x)" for k in rows)
        gen = f"{r['agreement_generated']:.3f}" if r["agreement_generated"] is not None else "-"
        lines.append(f"| {r['draft']} | {r['draft_vocab'] or 'full'} | {r['weight_bytes'] / 2**20:.0f} | {times} | "
                     f"{r['agreement']:.3f} ({r['agreement_ratio']:.3f}x) | {gen} |")
    return "\n".join(lines) + "\n"


def _scheme(path):
    from llmcad.bench.pass_variants import _scheme as scheme

    return scheme(path)


def _ints(text: str, flag: str) -> list:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"{flag} {text!r}: expected positive integers, e.g. {DEFAULT_ROWS}")
    return values


def _command() -> str:
    import shlex

    if sys.argv[1:3] == ["bench", "draft"]:
        return shlex.join(["llmcad", *sys.argv[1:]])
    return "llmcad bench draft (called from Python: " + shlex.join(sys.argv) + ")"
