"""Endurance: one long generation in llmcad mode with a streamed target; RSS and open file descriptors
sampled as tokens are committed must not grow after warm-up.

    PYTHONPATH=python python benchmarks/endurance.py --draft D --target T --memory-budget 2GiB \
        [--tokens 2000] [--warmup 200] [--ignore-eos] [--json]

    PYTHONPATH=python python benchmarks/endurance.py --draft D --target T --memory-budget 2GiB --faults 40

``--faults N`` runs N engines in turn instead, each with one fault (read error, Ctrl-C inside a pass,
two threads at once, dropped without close()), and reports fds, threads and RSS growth.

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
        prompt: str = PROMPT, mode: str = "llmcad", sample_every: int = 8) -> dict:
    """One generation of ``tokens`` tokens; returns the growth of RSS and fds after the warm-up part.
    ``sample_every``: committed chunks (one a target pass) between samples."""
    from llmcad import LLMCad

    with LLMCad.from_pretrained(draft, target, mode=mode, memory_budget=memory_budget) as engine:
        if ignore_eos:
            engine.eos_token_ids = set()
        engine.generate(prompt, 8)  # first-use allocations (thread pools, allocator arenas)
        sampler = Sampler(sample_every)
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


FAULTS = ("read-error", "interrupt", "two-threads", "dropped")


def run_faults(draft, target, *, memory_budget, engines: int = 12, tokens: int = 8, mode: str = "llmcad",
               prompt: str = PROMPT, bandwidth_cap: float = 4e6) -> dict:
    """Many engines in turn, each with one fault (FAULTS, round robin): an injected EIO, a
    KeyboardInterrupt inside a streamed pass, two threads generating at once, and an engine dropped
    without close(). Each fault must end as documented and the engine must then answer exactly as the
    first one did. Returns fds, threads and RSS after the first round of faults and at the end."""
    import errno
    import gc

    from llmcad import LLMCad
    from llmcad.errors import StreamerIOError

    options = {"bandwidth_cap": bandwidth_cap}
    want, outcomes, samples = None, [], []
    for i in range(engines):
        fault = FAULTS[i % len(FAULTS)]
        engine = LLMCad.from_pretrained(draft, target, mode=mode, memory_budget=memory_budget,
                                        streamer_options=options)
        got = engine.generate(prompt, tokens).tokens
        want = got if want is None else want
        outcomes.append(got == want and _inject(engine, fault, prompt, tokens, errno.EIO, StreamerIOError)
                        and engine.generate(prompt, tokens).tokens == want)
        if fault != "dropped":
            engine.close()
        del engine  # "dropped": the finalizer releases it
        gc.collect()
        if i + 1 == len(FAULTS) or i + 1 == engines:
            time.sleep(0.2)  # threads of the last engine finish exiting
            samples.append((rss_bytes(), open_fds(), threads()))
    warm, last = samples[0], samples[-1]
    return {"engines": engines, "faults": list(FAULTS), "all_exact": all(outcomes), "outcomes": outcomes,
            "rss_after_warmup_bytes": warm[0], "rss_end_bytes": last[0], "rss_growth_bytes": last[0] - warm[0],
            "fds_after_warmup": warm[1], "fds_end": last[1], "fds_growth": last[1] - warm[1],
            "threads_after_warmup": warm[2], "threads_end": last[2], "threads_growth": last[2] - warm[2]}


def _inject(engine, fault, prompt, tokens, eio, io_error) -> bool:
    """Run one fault on ``engine``; True when it ended as documented."""
    import threading

    if fault == "read-error":
        engine.streamed.drop_prefetch()
        engine.streamed.streamer.inject_fault(1, eio)
        return _raises(lambda: engine.generate(prompt, tokens), io_error)
    if fault == "interrupt":
        layer = engine.target.model.layers[engine.placement.streamed_layers[-1]]

        def interrupt(module, args):
            handle.remove()
            raise KeyboardInterrupt

        handle = layer.register_forward_pre_hook(interrupt)
        return _raises(lambda: engine.generate(prompt, tokens), KeyboardInterrupt)
    if fault == "two-threads":
        results = []
        callers = [threading.Thread(target=lambda: results.append(engine.generate(prompt, tokens).tokens))
                   for _ in range(2)]
        for t in callers:
            t.start()
        for t in callers:
            t.join(timeout=120)
        return len(results) == 2 and results[0] == results[1]
    return True  # "dropped": nothing to inject; the engine is released without close()


def _raises(call, kind) -> bool:
    try:
        call()
    except kind:
        return True
    return False


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
    p.add_argument("--faults", type=int, default=0, metavar="ENGINES", help="run ENGINES engines with faults")
    args = p.parse_args(argv)
    if args.faults:
        report = run_faults(args.draft, args.target, memory_budget=args.memory_budget, engines=args.faults)
        print(json.dumps(report))
        return 0 if report["all_exact"] else 1
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
