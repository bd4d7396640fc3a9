"""``llmcad bench streamer``: cold-read throughput of the weight streamer against a raw O_DIRECT
sequential read of the same file in the same process, and the overlap of streaming with compute.

Streaming mode (default): for each backend, ``--repeats`` times, alternately (a) evict the file and
read it with a plain C++ O_DIRECT loop of ``--raw-block`` blocks (4 MiB, like ``dd iflag=direct
bs=4M``) and (b) evict it and stream it as layers of ``--layer-bytes`` through the ring (acquire +
release, no compute). ``streamer_gbps`` and ``raw_gbps`` are medians; ``ratio`` is the median of the
per-repeat ratios (each pair is measured back to back, so storage drift hits both alike).

Overlap mode (``--overlap``): a consumer per layer (torch matmuls, or ``--consumer sleep`` standing
for an accelerator), sized so compute ~= IO, over
``--passes`` passes of the file (the next pass's first layer is prefetched during the last layer's
compute, as a model's next forward pass would be; only the very first read cannot overlap). Reports
IO alone, compute alone and overlapped wall time (medians) and ``ratio``, the median over repeats of
overlapped / max(IO, compute).

Part of llmcad.bench (tools): may import the whole package; nothing outside llmcad.bench imports it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

from llmcad import build_info
from llmcad.streaming.streamer import WeightStreamer, evict_from_page_cache, raw_direct_read_gbps

_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KIB": 1 << 10, "M": 10**6, "MB": 10**6, "MIB": 1 << 20,
          "G": 10**9, "GB": 10**9, "GIB": 1 << 30}


def parse_bytes(text: str) -> int:
    """'1GiB' -> 1073741824, '200MB' -> 200000000, '4096' -> 4096."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 1GiB, 128MiB, 200MB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--file", help="existing file to stream (kept); default: a temporary random file of --size")
    src.add_argument("--size", type=parse_bytes, default=parse_bytes("1GiB"), help="size of the temporary file (1GiB)")
    parser.add_argument("--dir", default=".", help="where the temporary file goes; use a real disk, not tmpfs (.)")
    parser.add_argument("--backend", choices=["auto", "io_uring", "pread", "all"], default="all")
    parser.add_argument("--buffers", type=int, default=2, help="ring buffers (2)")
    parser.add_argument("--layer-bytes", type=parse_bytes, default=parse_bytes("128MiB"), help="layer size (128MiB)")
    parser.add_argument("--chunk-bytes", type=parse_bytes, default=1 << 20, help="bytes per read (1MiB)")
    parser.add_argument("--queue-depth", type=int, default=64, help="io_uring reads in flight (64)")
    parser.add_argument("--raw-block", type=parse_bytes, default=4 << 20, help="block of the raw O_DIRECT baseline (4MiB)")
    parser.add_argument("--repeats", type=int, default=5, help="measured repeats; medians are reported (5)")
    parser.add_argument("--overlap", action="store_true", help="overlap a matmul consumer with the streaming")
    parser.add_argument("--passes", type=int, default=3, help="passes over the file in --overlap mode (3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the --overlap consumer (1)")
    parser.add_argument("--consumer", choices=["matmul", "sleep"], default="matmul",
                        help="--overlap compute: torch matmuls on the CPU, or a sleep standing for an "
                             "accelerator (immune to CPU contention) (matmul)")
    parser.add_argument("--json", action="store_true", help="one JSON object per backend instead of text")


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1 or args.buffers < 1 or args.passes < 1:
        raise ValueError("--repeats, --buffers and --passes must be >= 1")
    tmpdir = None
    path = args.file
    try:
        if path is None:
            tmpdir = tempfile.mkdtemp(prefix="llmcad_bench_streamer_", dir=args.dir)
            path = os.path.join(tmpdir, "weights.bin")
            _write_random_file(path, args.size)
        for backend in _backends(args.backend):
            record = _overlap(path, backend, args) if args.overlap else _throughput(path, backend, args)
            print(json.dumps(record) if args.json else _describe(record), flush=True)
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    return 0


# ---------------------------------------------------------------- workloads
def _backends(choice: str) -> list[str]:
    if choice != "all":
        return [choice]
    return ["pread", "io_uring"] if build_info()["io_uring_available"] else ["pread"]


def _write_random_file(path: str, size: int) -> None:
    rng = np.random.default_rng(0)
    piece = 64 << 20
    with open(path, "wb") as f:
        for start in range(0, size, piece):
            f.write(rng.bytes(min(piece, size - start)))
        f.flush()
        os.fsync(f.fileno())


def _open(path: str, backend: str, args) -> tuple[WeightStreamer, list[int]]:
    size = os.path.getsize(path)
    layer = min(args.layer_bytes, size)
    s = WeightStreamer([path], buffer_bytes=layer, num_buffers=args.buffers, backend=backend,
                       queue_depth=args.queue_depth, chunk_bytes=args.chunk_bytes)
    ids = [s.add_layer([(0, off, min(layer, size - off))]) for off in range(0, size, layer)]
    return s, ids


def _stream(s: WeightStreamer, ids: list[int], passes: int = 1, consume=None) -> float:
    """Seconds to stream `passes` x ids through the ring, keeping every buffer busy."""
    order = ids * passes
    ahead = s.stats()["num_buffers"]
    t0 = time.perf_counter()
    for i in order[:ahead]:
        s.prefetch(i)
    for k, i in enumerate(order):
        s.acquire(i)
        if k + ahead < len(order):
            s.prefetch(order[k + ahead])  # queued now, starts as soon as a buffer frees
        if consume is not None:
            consume()
        s.release(i)
    return time.perf_counter() - t0


def _throughput(path: str, backend: str, args) -> dict:
    size = os.path.getsize(path)
    s, ids = _open(path, backend, args)
    with s:
        evict_from_page_cache(path)
        raw_direct_read_gbps(path, args.raw_block)  # warm-up: first-touch effects of device and allocator
        raws, streams = [], []
        for _ in range(args.repeats):
            evict_from_page_cache(path)
            raws.append(raw_direct_read_gbps(path, args.raw_block))
            evict_from_page_cache(path)
            streams.append(size / _stream(s, ids) / 1e9)
        stats = s.stats()
    return {
        "backend": stats["backend"], "direct": stats["direct"], "buffers": args.buffers,
        "streamer_gbps": round(statistics.median(streams), 4), "raw_gbps": round(statistics.median(raws), 4),
        "ratio": round(statistics.median(a / b for a, b in zip(streams, raws)), 4),
        "layer_bytes": min(args.layer_bytes, size), "raw_block_bytes": args.raw_block, "file_bytes": size,
        "repeats": args.repeats,
    }


def _matmul_consumer(seconds_per_layer: float, threads: int):
    """A closure doing ~seconds_per_layer of fp32 matmuls (calibrated here) into a fixed output."""
    import torch

    torch.set_num_threads(threads)
    n = 512
    a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    for _ in range(3):
        torch.mm(a, b, out=out)
    reps = 50
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b, out=out)
    count = max(1, round(seconds_per_layer / ((time.perf_counter() - t0) / reps)))

    def consume():
        for _ in range(count):
            torch.mm(a, b, out=out)

    return consume


def _sleep_consumer(seconds_per_layer: float):
    return lambda: time.sleep(seconds_per_layer)


def _overlap(path: str, backend: str, args) -> dict:
    s, ids = _open(path, backend, args)
    steps = len(ids) * args.passes
    with s:
        evict_from_page_cache(path)
        io_calibration = _stream(s, ids)
        per_layer = io_calibration / len(ids)
        consume = _matmul_consumer(per_layer, args.threads) if args.consumer == "matmul" else _sleep_consumer(per_layer)
        ios, computes, overlaps = [], [], []
        for _ in range(args.repeats):  # the three runs back to back, so drift hits them alike
            evict_from_page_cache(path)
            ios.append(_stream(s, ids, args.passes))
            t0 = time.perf_counter()
            for _ in range(steps):
                consume()
            computes.append(time.perf_counter() - t0)
            evict_from_page_cache(path)
            overlaps.append(_stream(s, ids, args.passes, consume))
        stats = s.stats()
    ratios = [o / max(i, c) for i, c, o in zip(ios, computes, overlaps)]
    io, compute, both = (statistics.median(v) for v in (ios, computes, overlaps))
    return {
        "mode": "overlap", "consumer": args.consumer, "backend": stats["backend"], "direct": stats["direct"],
        "buffers": args.buffers,
        "layers": len(ids), "passes": args.passes, "io_s": round(io, 4), "compute_s": round(compute, 4),
        "overlap_s": round(both, 4), "ratio": round(statistics.median(ratios), 4), "repeats": args.repeats,
    }


def _describe(r: dict) -> str:
    if r.get("mode") == "overlap":
        return (f"overlap ({r['consumer']}) {r['backend']:<8} direct={r['direct']} buffers={r['buffers']} {r['layers']} layers x "
                f"{r['passes']} passes: IO {r['io_s']:.3f} s, compute {r['compute_s']:.3f} s, overlapped "
                f"{r['overlap_s']:.3f} s = {r['ratio']:.3f} x max(IO, compute)")
    return (f"streamer {r['backend']:<8} direct={r['direct']} buffers={r['buffers']} "
            f"layer={r['layer_bytes'] / 2**20:.0f}MiB: {r['streamer_gbps']:.3f} GB/s, raw O_DIRECT "
            f"{r['raw_block_bytes'] / 2**20:g}MiB blocks "
            f"{r['raw_gbps']:.3f} GB/s, ratio {r['ratio']:.3f} (median of {r['repeats']})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llmcad bench streamer", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
