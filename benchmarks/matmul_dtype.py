"""What a tree token costs the target on this CPU, by compute dtype: one thread, the target's largest
linear (Qwen2.5-1.5B's MLP, 8960×1536) at 1, 16 and 150 rows, bf16, fp16 and fp32, median of repeats
after a warm-up; each dtype as a ratio to fp32 in the same run.

    PYTHONPATH=python python benchmarks/matmul_dtype.py [--out benchmarks/results/matmul_dtype.json]
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time

import torch

from llmcad.bench.e2e import git_commit

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def median_seconds(x: torch.Tensor, w: torch.Tensor, repeats: int) -> float:
    torch.nn.functional.linear(x, w)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.nn.functional.linear(x, w)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,16,150")
    p.add_argument("--shape", default="8960,1536", help="weight shape OUT,IN")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n_out, n_in = (int(v) for v in args.shape.split(","))
    weight = torch.randn(n_out, n_in)
    results = []
    for rows in (int(v) for v in args.rows.split(",")):
        x = torch.randn(rows, n_in)
        ms = {name: 1e3 * median_seconds(x.to(dt), weight.to(dt), args.repeats) for name, dt in DTYPES.items()}
        for name, value in ms.items():
            results.append({"rows": rows, "dtype": name, "median_ms": value, "gflops": 2 * rows * n_out * n_in / value / 1e6,
                            "x_fp32_time": value / ms["float32"]})
            print(f"rows {rows:4d} {name:9s} {value:8.2f} ms  {results[-1]['gflops']:6.1f} GFLOP/s  "
                  f"{results[-1]['x_fp32_time']:.2f}x fp32's time")
    report = {"command": shlex.join(["python", *sys.argv]), "git_commit": git_commit(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
              "shape": [n_out, n_in], "results": results}
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
