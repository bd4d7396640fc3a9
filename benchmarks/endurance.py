"""Endurance: one long generation in llmcad mode with a streamed target; RSS and open file descriptors
sampled as tokens are committed must not grow after warm-up.

    PYTHONPATH=python python benchmarks/endurance.py --draft D --target T --memory-budget 2GiB \
        [--tokens 2000] [--warmup 200] [--ignore-eos] [--json]

Prints the samples' summary: RSS and fds at the end of warm-up and at the end, their growth, and the
largest growth seen; ``--json`` prints one object. The KV caches grow by design (one position per
token); ``kv_growth_bytes`` says by how much, so the RSS growth can be judged against it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

PROMPT = "Write a long story about a lighthouse keeper who learns to program."


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def threads() -> int:
    """Native threads of this process (Python's and the streamer's C++ IO threads)."""
    return len(os.listdir("/proc/self/task"))


class Sampler:
    """A text streamer for generate: samples (calls, RSS, fds, threads) every ``every`` committed chunks."""

    def __init__(self, every: int = 8):
        self.every, self.calls, self.samples = every, 0, []

    def __call__(self, text_delta: str) -> None:
        self.calls += 1
        if self.calls % self.every == 0:
            self.samples.append((self.calls, rss_bytes(), open_fds(), threads()))


def kv_bytes_per_token(engine) -> int:
    from llmcad.streaming.budget import kv_cache_bytes

    return sum(kv_cache_bytes(m.config, 1, m.dtype) for m in (engine.draft, engine.target))


def run(draft, target, *, memory_budget, tokens: int, warmup_fraction: float, ignore_eos: bool,
        prompt: str = PROMPT, mode: str = "llmcad") -> dict:
    """One generation of ``tokens`` tokens; returns the growth of RSS and fds after the warm-up part."""
    from llmcad import LLMCad

    with LLMCad.from_pretrained(draft, target, mode=mode, memory_budget=memory_budget) as engine:
        if ignore_eos:
            engine.eos_token_ids = set()
        engine.generate(prompt, 8)  # first-use allocations (thread pools, allocator arenas)
        sampler = Sampler()
        start = time.perf_counter()
        result = engine.generate(prompt, tokens, streamer=sampler)
        elapsed = time.perf_counter() - start
        samples = sampler.samples
        if len(samples) < 4:
            raise SystemExit(f"only {len(samples)} samples: generate more tokens (stopped: "
                             f"{result.stats['stop_reason']})")
        warm = samples[int(len(samples) * warmup_fraction)]
        last = samples[-1]
        generated = len(result.tokens)
        return {
            "tokens": generated, "stop_reason": result.stats["stop_reason"], "seconds": elapsed,
            "tokens_per_s": generated / elapsed, "target_passes": result.stats["target_passes"],
            "samples": len(samples),
            "rss_after_warmup_bytes": warm[1], "rss_end_bytes": last[1], "rss_growth_bytes": last[1] - warm[1],
            "rss_max_bytes": max(s[1] for s in samples),
            "fds_after_warmup": warm[2], "fds_end": last[2], "fds_growth": last[2] - warm[2],
            "fds_max": max(s[2] for s in samples),
            "threads_after_warmup": warm[3], "threads_end": last[3], "threads_max": max(s[3] for s in samples),
            "kv_growth_bytes": kv_bytes_per_token(engine) * int(generated * (1 - warmup_fraction)),
        }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--draft", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--memory-budget", required=True, help="e.g. 2GiB (the target must stream)")
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--warmup-fraction", type=float, default=0.1, help="part of the samples that is warm-up")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS (always generate --tokens)")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    report = run(args.draft, args.target, memory_budget=args.memory_budget, tokens=args.tokens,
                 warmup_fraction=args.warmup_fraction, ignore_eos=args.ignore_eos, prompt=args.prompt)
    if args.json:
        print(json.dumps(report))
    else:
        mib = 2**20
        print(f"{report['tokens']} tokens in {report['seconds']:.1f} s ({report['tokens_per_s']:.2f} tok/s, "
              f"{report['target_passes']} passes, stop: {report['stop_reason']})")
        print(f"RSS after warm-up {report['rss_after_warmup_bytes'] / mib:.1f} MiB, end "
              f"{report['rss_end_bytes'] / mib:.1f} MiB, growth {report['rss_growth_bytes'] / mib:+.1f} MiB "
              f"(KV caches grew {report['kv_growth_bytes'] / mib:.1f} MiB by design)")
        print(f"open fds after warm-up {report['fds_after_warmup']}, end {report['fds_end']}, "
              f"growth {report['fds_growth']:+d}; threads after warm-up {report['threads_after_warmup']}, end "
              f"{report['threads_end']}, max {report['threads_max']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
