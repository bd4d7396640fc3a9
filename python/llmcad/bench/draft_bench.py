"""``llmcad bench draft``: what a draft forward costs and how often the draft agrees with the target, for a
draft, its packed copies (``--variant int8=DIR``), pruned output layers (``--draft-vocab N,...``) and
output layers packed at load (``--draft-head float,int8,int4``).

For each configuration (draft x vocabulary x head):
- ``forward_s``: median seconds of one draft forward of R rows (the drafter's own call: the decoder over
  R new tokens after a KV cache of ``--kv-length`` positions, then its output layer and each row's top
  tokens), for R in ``--rows``; after ``--warmup`` unmeasured forwards, ``--repeats`` measured ones; the
  tokens are drawn with ``--seed``.
- ``agreement``: over the workload's teacher-forced tokens (each prompt, then ``--new-tokens`` of the
  target's own greedy continuation), the share of positions where the draft's top-1 token (among the
  tokens it may propose) is the target's top-1; ``agreement_generated``: the same over the continuations.
Every figure also appears as a ratio against the first configuration, the ``--draft`` with its full
vocabulary and the first head, measured in the same command (``speedup`` = its time / this time; ``agreement_ratio`` = this
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
from dataclasses import dataclass

import torch

from llmcad.bench import workloads
from llmcad.bench.e2e import parse_ints
from llmcad.bench.pass_variants import _commit, _label, _parse_variant

DEFAULT_ROWS = "1,2,4,8,16,32"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft", required=True, help="the baseline draft (e.g. the bf16 one): a prepared directory")
    p.add_argument("--target", required=True, help="the target whose top-1 tokens the drafts are compared with")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=DIR", help="also this draft (e.g. "
                   "int8=DIR from prepare --quantize int8), repeatable")
    p.add_argument("--draft-vocab", default="none", metavar="N,...", help="also each draft with its output layer "
                   "cut to N tokens (llmcad.models.vocab), e.g. 32768,16384 (default: none)")
    p.add_argument("--draft-head", default="float", metavar="HEAD,...", help="each draft's output layer held as each "
                   "of these: float, int8, int4 (llmcad.models.draft_head), e.g. float,int8 (default: float)")
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
    commit = _commit()  # the code measured, read before the run (a long run may outlive a checkout)
    rows = parse_ints(args.rows, "--rows")
    vocabs = [None] + [n for n in (parse_draft_vocab(v, "--draft-vocab") for v in args.draft_vocab.split(",")) if n]
    drafts = [(_label(resolve(args.draft)), resolve(args.draft))] + \
        [(name, resolve(path)) for name, path in map(_parse_variant, args.variant)]
    target = resolve(args.target)
    sequences, generated_from = teacher_forced(target, workloads.load(args, target), args.new_tokens, args.dtype)
    heads = parse_heads(args.draft_head)
    configs = [config for name, path in drafts
               for config in draft_configs(name, path, target, vocabs, args.dtype, heads)]
    times = forward_seconds(configs, rows, args)
    agreements = agreement(configs, sequences, generated_from)
    records = [{"draft": c.name, "path": str(c.path), "quantize": _scheme(c.path), "draft_vocab": c.vocab,
                "draft_head": c.head_scheme,
                "weight_bytes": c.weight_bytes, "forward_s": t, **a} for c, t, a in zip(configs, times, agreements)]
    add_ratios(records)
    report = {"command": _command(), "commit": commit, "threads": torch.get_num_threads(),
              "kv_length": args.kv_length, "rows": rows, "repeats": args.repeats, "warmup": args.warmup,
              "seed": args.seed, "new_tokens": args.new_tokens, "dtype": args.dtype, "target": str(target),
              "positions": sum(len(seq) - 1 for seq, _ in sequences), "records": records}
    print(json.dumps(report, indent=1) if args.json else markdown(report))
    return 0


@dataclass
class Config:
    """One draft with one output layer: ``head`` [N or vocab, hidden], ``ids`` its rows' token ids (None:
    row i is token i). The configurations of one draft share its loaded model and swap ``lm_head``."""

    name: str
    path: object
    vocab: int | None
    model: torch.nn.Module
    head: torch.nn.Module
    ids: object
    weight_bytes: int = 0
    head_scheme: str = "float"
    embeddings: torch.nn.Module = None  # None: the model's own (float) input embeddings

    def use(self) -> torch.nn.Module:
        self.model.lm_head = self.head
        self.model.set_input_embeddings(self.embeddings)
        return self.model


def parse_heads(text: str) -> list:
    """``--draft-head`` as a list of distinct head schemes (float, int8, int4), in order."""
    from llmcad.models.draft_head import parse_draft_head

    heads = [parse_draft_head(h, "--draft-head") for h in text.split(",") if h.strip()]
    if not heads or "auto" in heads:
        raise ValueError(f"--draft-head {text!r}: expected a list of float, int8, int4")
    return list(dict.fromkeys(heads))


def draft_configs(name, path, target, vocabs: list, dtype, heads=("float",)) -> list:
    """The draft at ``path`` loaded once, with its full output layer and each pruned one, each held as
    each of ``heads`` (float, or packed by llmcad.models.draft_head)."""
    from llmcad.models.draft_head import packed_head, resolve
    from llmcad.models.loading import draft_vocab_ids, load_causal_lm, load_tokenizer
    from llmcad.models.vocab import pruned_head
    from llmcad.streaming.budget import module_bytes

    model = load_causal_lm(path, dtype=dtype)
    tokenizer = load_tokenizer(path)
    configs = []
    full, embeddings = model.lm_head, model.get_input_embeddings()
    tied = full.weight is embeddings.weight
    for n in vocabs:
        model.lm_head = full  # pruning cuts the float layer, not the last configuration's
        ids = draft_vocab_ids(model, tokenizer, n, target)
        rows = full if ids is None else pruned_head(model, ids)
        for head in heads:  # packed as the engine packs it (a tied full head: the embeddings too)
            scheme, group = resolve(head, None, tuple(rows.weight.shape), rows.weight.device)
            layer, table = (rows, None) if scheme is None else \
                packed_head(rows, scheme, group, with_table=tied and rows is full)
            config = Config(name, path, n if ids is not None else None, model, layer, ids, head_scheme=head,
                            embeddings=table or embeddings)
            config.weight_bytes = module_bytes(config.use())  # the full layer counts once: it is tied, or replaced
            configs.append(config)
            print(f"  {name} vocab {n or 'full'} head {head}: {config.weight_bytes / 2**20:.0f} MiB", file=sys.stderr,
                  flush=True)
    configs[0].use()
    return configs


def teacher_forced(target, loaded: list, new_tokens: int, dtype) -> tuple[list, list]:
    """([(token sequence: a prompt then the target's greedy continuation, the target's top-1 after each
    prefix)], where each continuation starts)."""
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
    print(f"  target: {len(sequences)} sequences", file=sys.stderr, flush=True)
    tops = [_top1(_causal_logits(model, seq), None) for seq in sequences]
    del model
    gc.collect()
    return list(zip(sequences, tops)), starts


def _causal_logits(model, seq: list):
    """RowLogits of one causal forward over ``seq`` (an empty cache)."""
    from transformers import DynamicCache

    from llmcad.speculative.forward import causal_rows, forward_with_mask

    weight = model.get_input_embeddings().weight
    mask = causal_rows(0, len(seq), len(seq), weight.dtype, weight.device)
    return forward_with_mask(model, DynamicCache(), seq, torch.arange(len(seq)), mask)


def _top1(logits, vocab_ids) -> torch.Tensor:
    rows = torch.cat([chunk.argmax(-1) for _, chunk in logits.chunks()]).cpu()
    return rows if vocab_ids is None else vocab_ids[rows]


def agreement(configs: list, sequences: list, generated_from: list) -> list:
    """Per configuration: {"agreement", "agreement_generated"} (see the module doc). One decoder forward
    per draft, input embeddings and sequence; each output layer is applied to its hidden states."""
    from llmcad.speculative.forward import RowLogits

    counts = {id(c): [0, 0, 0, 0] for c in configs}
    groups = {}
    for c in configs:
        groups.setdefault((id(c.model), id(c.embeddings)), []).append(c)
    for (seq, target_top), start in zip(sequences, generated_from):
        for mine in groups.values():
            logits = _causal_logits(mine[0].use(), seq)
            for c in mine:
                head = RowLogits(c.head, logits.hidden) if logits.head is not None else _causal_logits(c.use(), seq)
                same = (_top1(head, c.ids) == target_top)[:-1]  # the last position predicts past the sequence
                n = counts[id(c)]
                n[0], n[1] = n[0] + int(same.sum()), n[1] + len(same)
                n[2], n[3] = n[2] + int(same[start - 1:].sum()), n[3] + len(same[start - 1:])
    return [{"agreement": a / max(t, 1), "agreement_generated": g / tg if tg else None}
            for a, t, g, tg in (counts[id(c)] for c in configs)]


def forward_seconds(configs: list, rows: list, args) -> list:
    """Per configuration, {rows: median seconds} of the drafter's forward of that many rows after
    ``args.kv_length`` keys. Rounds interleave the configurations (a load that drifts hits them all)."""
    from transformers import DynamicCache

    from llmcad.speculative.draft import TreeDrafter
    from llmcad.speculative.forward import forward_with_mask, prefill

    generator = torch.Generator().manual_seed(args.seed)
    caches = {}
    for c in configs:  # one KV cache per draft model (what it holds does not depend on the output layer)
        if id(c.model) not in caches:
            vocab = c.model.get_input_embeddings().weight.shape[0]
            caches[id(c.model)] = DynamicCache()
            prefill(c.model, caches[id(c.model)],
                    torch.randint(0, vocab, (args.kv_length,), generator=generator).tolist(), 64)
    drafters = [TreeDrafter(c.model, [0], vocab_ids=c.ids) for c in configs]  # their top-token selection
    times = [{str(r): [] for r in rows} for _ in configs]
    vocab = min(c.model.get_input_embeddings().weight.shape[0] for c in configs)
    for round_ in range(args.warmup + args.repeats):
        for r in rows:
            tokens = torch.randint(0, vocab, (r,), generator=generator).tolist()
            positions = torch.full((r,), args.kv_length)
            for c, drafter, mine in zip(configs, drafters, times):
                dtype = c.model.get_input_embeddings().weight.dtype
                mask = torch.zeros((1, 1, r, args.kv_length + r), dtype=dtype)
                mask[0, 0, :, args.kv_length:] = float("-inf")
                mask[0, 0, :, args.kv_length:].fill_diagonal_(0)  # siblings: each row sees the prefix and itself
                model, cache = c.use(), caches[id(c.model)]
                t0 = time.perf_counter()
                drafter._top(forward_with_mask(model, cache, tokens, positions, mask))
                seconds = time.perf_counter() - t0
                cache.crop(-r)
                if round_ >= args.warmup:
                    mine[str(r)].append(seconds)
    return [{k: statistics.median(v) for k, v in mine.items()} for mine in times]


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
             f"| draft | vocab | head | MiB | {head} | agreement (x) | agreement on generated |",
             "|---|---|---|---|" + "---|" * len(rows) + "---|---|"]
    for r in report["records"]:
        times = " | ".join(f"{1e3 * r['forward_s'][k]:.1f} ({r['speedup'][k]:.2f}x)" for k in rows)
        gen = f"{r['agreement_generated']:.3f}" if r["agreement_generated"] is not None else "-"
        lines.append(f"| {r['draft']} | {r['draft_vocab'] or 'full'} | {r.get('draft_head', 'float')} | "
                     f"{r['weight_bytes'] / 2**20:.0f} | {times} | "
                     f"{r['agreement']:.3f} ({r['agreement_ratio']:.3f}x) | {gen} |")
    return "\n".join(lines) + "\n"


def _scheme(path):
    from llmcad.bench.pass_variants import _scheme as scheme

    return scheme(path)


def _command() -> str:
    import shlex

    if sys.argv[1:3] == ["bench", "draft"]:
        return shlex.join(["llmcad", *sys.argv[1:]])
    return "llmcad bench draft (called from Python: " + shlex.join(sys.argv) + ")"
