"""``llmcad bench pass``: the command; the measurement is :mod:`llmcad.bench.pass_measure`, the
several-target comparison :mod:`llmcad.bench.pass_variants`.

Part of llmcad.bench (tools): may import the whole package; nothing outside llmcad.bench imports it.
"""
from __future__ import annotations

import argparse
import json

from llmcad.bench.pass_measure import measure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="streamable safetensors directory (llmcad prepare)")
    parser.add_argument("--memory-budget", default=None,
                        help="plan placement under this budget (default: stream every layer)")
    parser.add_argument("--draft", default=None,
                        help="with --memory-budget: place the target as the engine does beside this draft "
                        "(runtime, draft, KV caches and pass working set counted; default: the target alone)")
    parser.add_argument("--tree-nodes", type=int, default=32, help="nodes in the verified tree")
    parser.add_argument("--prefix", type=int, default=64, help="tokens already in the KV cache")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-buffers", type=int, default=2)
    parser.add_argument("--backend", default="auto", choices=("auto", "io_uring", "pread"))
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="compute dtype (default: the checkpoint's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=DIR",
                        help="also measure this target (e.g. int4=DIR from prepare --quantize) in the same run, "
                        "with ratios against --target (see llmcad.bench.pass_variants)")
    parser.add_argument("--cap", default=None, metavar="RATE",
                        help="with --variant: add a setting with the streamer capped at RATE, e.g. 300MB/s")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from llmcad.models.catalog import resolve

    args.target = resolve(args.target)
    args.draft = resolve(args.draft) if args.draft is not None else None
    if args.variant or args.cap:
        from llmcad.bench.pass_variants import run_variants

        return run_variants(args)
    result = measure(args.target, memory_budget=args.memory_budget, draft=args.draft, tree_nodes=args.tree_nodes,
                     prefix_len=args.prefix, repeats=args.repeats, num_buffers=args.num_buffers,
                     backend=args.backend, dtype=args.dtype, seed=args.seed)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"pass over {args.tree_nodes} nodes, {result['streamed_layers']} layers streamed "
              f"({result['bytes_per_pass'] / 2**20:.0f} MiB, {result['backend']}): wall {result['wall_s']:.3f}s, "
              f"io {result['io_s']:.3f}s, compute {result['compute_s']:.3f}s, "
              f"overlap_ratio {result['overlap_ratio']:.3f}")
    return 0
