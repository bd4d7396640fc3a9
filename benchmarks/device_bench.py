"""GPU benchmarks for scripts/device_check.sh; prints one JSON line per figure and a table last.

Every figure is a ratio against a baseline measured in the same process: tree-plan kernels (GPU
against the C++ CPU kernels), H2D through the upload ring from prefilled host buffers (against one
large pinned cudaMemcpy of the same bytes), an event timeline of one streamed pass (the share of
compute that overlapped an upload), a cold streamed target pass (wall against max(IO, compute)) and
end-to-end tokens/s (llmcad against target-only). The streamed figures use a random fp16 Qwen2-shaped model of about 360 MB made here and
saved to $LLMCAD_BENCH_MODEL (default /tmp/llmcad-device-model): no downloads, no real model.

    python benchmarks/device_bench.py [--only tree_plan h2d timeline streamed_pass e2e] [--json-out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from llmcad.speculative import tree
from llmcad.speculative.forward import cache_kwargs

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
        dev_tokens = torch.as_tensor(tokens, device="cuda")

        def cpu():
            tree.position_ids(parents, prefix)
            tree.attention_mask(parents, prefix)
            tree.accept(parents, tokens, tokens)

        def gpu():  # one upload of the parents, plan and walk on the device, one copy back
            dev = tree.DeviceTree(parents, "cuda")
            dev.position_ids(prefix)
            dev.attention_mask(prefix)
            dev.accept(tokens, dev_tokens)

        cpu_s = median_seconds(cpu, sync=False)
        gpu_s = median_seconds(gpu)
        rows.append({"bench": "tree_plan", "nodes": n, "cpu_us": cpu_s * 1e6, "gpu_us": gpu_s * 1e6,
                     "gpu_speedup": cpu_s / gpu_s})
    return rows


# ---------------------------------------------------------------- a few-hundred-MB random model
MODEL_DIR = Path(os.environ.get("LLMCAD_BENCH_MODEL", "/tmp/llmcad-device-model"))


def build_model(root=MODEL_DIR, *, hidden=1024, intermediate=4096, layers=12, draft_layers=2, seed=SEED):
    """A random fp16 Qwen2-shaped target (~360 MB: 12 layers of ~30 MB) and its draft (the target's first
    ``draft_layers`` layers, embeddings and head), saved under ``root`` (reused when there). Peaked
    distributions and weak later layers (as llmcad.bench.tiny_pair) so the draft agrees with it often."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from llmcad.bench import tiny_pair

    target_dir, draft_dir = root / "target", root / "draft"
    if all((d / "config.json").is_file() for d in (target_dir, draft_dir)):
        return draft_dir, target_dir
    tokenizer = tiny_pair._tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                         max_position_embeddings=1024, bos_token_id=0, eos_token_id=1, pad_token_id=3,
                         tie_word_embeddings=False, use_sliding_window=False)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(25.0)
        for layer in model.model.layers[draft_layers:]:
            layer.self_attn.o_proj.weight.mul_(0.15)
            layer.mlp.down_proj.weight.mul_(0.15)
    tiny_pair._save(model, tokenizer, target_dir)
    tiny_pair._save(tiny_pair._truncated(model.float().cpu(), draft_layers).half(), tokenizer, draft_dir)
    return draft_dir, target_dir


def _sync_timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _evict(index):
    from llmcad.streaming.streamer import evict_from_page_cache

    for path in index.files:
        evict_from_page_cache(path)


def _feed_pass(index, layers, gpu_path, *, direct=True, evict=True) -> tuple:
    """Storage -> pinned ring -> GPU for ``layers`` with no compute: (seconds, bytes)."""
    from llmcad.streaming.gpu_upload import DeviceFeed
    from llmcad.streaming.streamer import WeightStreamer, layout_bytes

    ranges = [index.layer_ranges(i).ranges for i in layers]
    slot = max(layout_bytes(r) for r in ranges)
    with WeightStreamer(index.files, buffer_bytes=slot, num_buffers=2, direct=direct) as streamer:
        ids = [streamer.add_layer(r) for r in ranges]
        feed = DeviceFeed(gpu_path, "cuda", acquire=streamer.acquire, release=streamer.release, host_buffers=2,
                          slot_bytes=slot)
        if evict:
            _evict(index)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for sid in ids:
            streamer.prefetch(sid)
        total = 0
        for k, sid in enumerate(ids):
            raw = feed.begin(sid).raw
            if gpu_path == "zero-copy":
                raw.sum(dtype=torch.int64)  # make the GPU actually read the bytes in place
            total += raw.numel()
            feed.end(sid, ids[k + 1] if k + 1 < len(ids) else None)
        feed.finish_pass()
        torch.cuda.synchronize()
        return time.perf_counter() - start, total


def _events():
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def bench_h2d(repeats=5):
    """H2D alone: the upload ring (2 device slots, side stream, events) fed from host buffers already
    filled (pinned, one per layer: no storage IO), against ONE large pinned cudaMemcpy of the same
    bytes, the physical limit. GB/s of each and their ratio (medians of event-timed runs)."""
    from llmcad.streaming.gpu_upload import UploadRing
    from llmcad.streaming.weights import load_index

    _, target_dir = build_model()
    index = load_index(target_dir)
    sizes = [index.layer_bytes(i) for i in range(index.num_layers)]
    hosts = [torch.randint(0, 255, (n,), dtype=torch.uint8).pin_memory() for n in sizes]
    total = sum(sizes)
    big_host = torch.cat(hosts).pin_memory()
    big_dev = torch.empty(total, dtype=torch.uint8, device="cuda")
    ring = UploadRing(max(sizes), "cuda")
    stream = torch.cuda.current_stream()

    def through_ring():
        for k, host in enumerate(hosts):
            ring.upload(k, host)
            ring.take(k)
            ring.done(k)
        ring.drain()

    def one_copy():
        big_dev.copy_(big_host, non_blocking=True)

    def timed(fn) -> float:
        start, end = _events()
        torch.cuda.synchronize()
        start.record(stream)
        fn()
        end.record(stream)  # the compute stream waited (take) for every upload
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    for fn in (through_ring, one_copy):  # warm-up
        timed(fn)
    ring_s = statistics.median(timed(through_ring) for _ in range(repeats))
    copy_s = statistics.median(timed(one_copy) for _ in range(repeats))
    return [{"bench": "h2d", "bytes": total, "layers": len(sizes), "one_memcpy_gbps": total / copy_s / 1e9,
             "ring_gbps": total / ring_s / 1e9, "ring_vs_one_memcpy": copy_s / ring_s}]


def bench_timeline(tree_nodes=512, prefix_len=64):
    """One streamed pass (copy path, page cache warm: host reads are memcpy) with CUDA events around
    every upload (side stream) and every layer's compute (compute stream). Figures: the share of
    compute time during which an upload was in flight, and of upload time overlapped by compute;
    0 for both would mean the copies and the kernels ran one after the other."""
    from transformers import DynamicCache

    from llmcad.streaming import gpu_upload
    from llmcad.streaming.budget import plan_placement
    from llmcad.streaming.streamed import load_streamed_target
    from llmcad.streaming.weights import load_index

    _, target_dir = build_model()
    index = load_index(target_dir)
    placement = plan_placement(index, memory_budget=1 << 50, max_resident_layers=0, num_buffers=2)
    target = load_streamed_target(target_dir, placement=placement, device="cuda",
                                  streamer_options={"gpu_path": "copy", "direct": False})
    rng = np.random.default_rng(SEED)
    vocab = target.model.config.vocab_size
    prefix = torch.as_tensor(rng.integers(0, vocab, (1, prefix_len)), device="cuda")
    ids = torch.as_tensor(rng.integers(0, vocab, (1, tree_nodes)), device="cuda")
    plan = tree.plan(random_parents(tree_nodes, rng), prefix_len, dtype=target.model.dtype, device="cuda")
    uploads, computes = [], []
    original = gpu_upload.UploadRing.upload

    def timed_upload(ring, key, host, on_copied=None):
        start, end = _events()
        start.record(ring.side)
        original(ring, key, host, on_copied)
        end.record(ring.side)
        uploads.append((start, end))

    def compute_start(module, args):
        computes.append(_events())
        computes[-1][0].record()

    def compute_end(module, args, output):
        computes[-1][1].record()

    hooks = [layer.register_forward_pre_hook(compute_start) for layer in target.layers]
    hooks += [layer.register_forward_hook(compute_end) for layer in target.layers]
    gpu_upload.UploadRing.upload = timed_upload
    try:
        with torch.no_grad():
            cache = DynamicCache(config=target.model.config)
            target.model(input_ids=prefix, past_key_values=cache, use_cache=True)  # warm: page cache, allocator
            torch.cuda.synchronize()
            uploads.clear()
            computes.clear()
            base = torch.cuda.Event(enable_timing=True)
            base.record()
            target.model(input_ids=ids, attention_mask=plan.mask, position_ids=plan.position_ids,
                         past_key_values=cache, use_cache=True)
            torch.cuda.synchronize()
    finally:
        gpu_upload.UploadRing.upload = original
        for h in hooks:
            h.remove()
        target.close()
    up = [(base.elapsed_time(a), base.elapsed_time(b)) for a, b in uploads]
    comp = [(base.elapsed_time(a), base.elapsed_time(b)) for a, b in computes]
    up_ms, comp_ms = sum(b - a for a, b in up), sum(b - a for a, b in comp)
    both = sum(max(0.0, min(b, d) - max(a, c)) for a, b in up for c, d in comp)
    return [{"bench": "timeline", "layers": len(comp), "uploads": len(up), "tree_nodes": tree_nodes,
             "upload_ms": up_ms, "compute_ms": comp_ms, "overlap_ms": both,
             "compute_overlapped": both / comp_ms if comp_ms else 0.0,
             "upload_overlapped": both / up_ms if up_ms else 0.0,
             "intervals": {"upload": up, "compute": comp}}]


def bench_streamed_pass(repeats=3, tree_nodes=32, prefix_len=64):
    """A cold streamed target pass (nothing prefetched, page cache evicted, every layer streamed):
    wall / max(IO alone, compute alone); 1.0 = perfect overlap, (IO + compute) / max = none."""
    from transformers import DynamicCache

    from llmcad.streaming.budget import plan_placement, resident_placement
    from llmcad.streaming.streamed import load_streamed_target
    from llmcad.streaming.weights import load_index

    _, target_dir = build_model()
    index = load_index(target_dir)
    resident = load_streamed_target(target_dir, placement=resident_placement(index), device="cuda").model
    rng = np.random.default_rng(SEED)
    parents = random_parents(tree_nodes, rng)
    vocab = resident.config.vocab_size
    ids = torch.as_tensor(rng.integers(0, vocab, (1, tree_nodes)), device="cuda")
    prefix = torch.as_tensor(rng.integers(0, vocab, (1, prefix_len)), device="cuda")
    plan = tree.plan(parents, prefix_len, dtype=resident.dtype, device="cuda")
    mask, positions = plan.mask, plan.position_ids

    def run(model):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=prefix, **cache_kwargs(model, cache), use_cache=True)
        torch.cuda.synchronize()
        return cache

    def tree_pass(model, cache):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_kwargs(model, cache), use_cache=True)

    rows = []
    placement = plan_placement(index, memory_budget=1 << 50, max_resident_layers=0, num_buffers=2)
    for gpu_path in ("copy", "zero-copy"):
        ctl = load_streamed_target(target_dir, placement=placement, device="cuda",
                                   streamer_options={"gpu_path": gpu_path})
        streamed = ctl.model
        try:
            tree_pass(resident, run(resident))  # warm-up
            tree_pass(streamed, run(streamed))
            walls, ios, computes = [], [], []
            for _ in range(repeats):
                cache = run(resident)
                computes.append(_sync_timed(lambda: tree_pass(resident, cache)))
                ios.append(_feed_pass(index, placement.streamed_layers, gpu_path)[0])
                cache = run(streamed)
                ctl.drop_prefetch()
                _evict(index)
                walls.append(_sync_timed(lambda: tree_pass(streamed, cache)))
            io_stats = ctl.stats()["streamer"]
        finally:
            ctl.close()
        wall, io, compute = (statistics.median(x) for x in (walls, ios, computes))
        rows.append({"bench": "streamed_pass", "gpu_path": gpu_path, "layers": len(placement.streamed_layers),
                     "bytes_per_pass": placement.bytes_per_pass, "tree_nodes": tree_nodes,
                     "wall_s": wall, "io_s": io, "compute_s": compute, "overlap_ratio": wall / max(io, compute),
                     "no_overlap_bound": (io + compute) / max(io, compute),
                     "backend": io_stats["backend"], "direct": io_stats["direct"], "pinned": io_stats["pinned"]})
    return rows


def bench_e2e(new_tokens=24, repeats=2):
    """Tokens/s of llmcad (tree + fallback + pipeline) against target-only on the same GPU target, greedy:
    the tiny fp32 pair resident, and the ~360 MB random fp16 pair with every target layer streamed (copy
    path). Random models: the ratio shows the mechanics, not a real pair's acceptance."""
    from llmcad import LLMCad
    from llmcad.bench import tiny_pair
    from llmcad.streaming.budget import plan_placement
    from llmcad.speculative.policy import make_policy
    from llmcad.models.loading import load_causal_lm, load_tokenizer
    from llmcad.streaming.streamed import load_streamed_target
    from llmcad.streaming.weights import load_index

    rows = []
    tiny_draft, tiny_target = tiny_pair.build_tiny_pair(MODEL_DIR / "tiny")
    big_draft, big_target = build_model()
    for name, draft_dir, target_dir, streamed in (("tiny-resident", tiny_draft, tiny_target, False),
                                                  ("360MB-streamed", big_draft, big_target, True)):
        tokenizer = load_tokenizer(target_dir)
        draft = load_causal_lm(draft_dir, device="cuda")
        controller = None
        if streamed:
            placement = plan_placement(load_index(target_dir), memory_budget=1 << 50, max_resident_layers=0,
                                       num_buffers=2)
            controller = load_streamed_target(target_dir, placement=placement, device="cuda")
            target = controller.model
        else:
            target = load_causal_lm(target_dir, device="cuda")
        prompt = tokenizer(tiny_pair.PROMPTS[0])["input_ids"]
        speeds, outputs = {}, {}
        try:
            for mode in ("target-only", "llmcad"):
                engine = LLMCad(draft, target, tokenizer, make_policy(mode), streamed=controller)
                engine.generate(prompt, 4)  # warm-up
                times = []
                for _ in range(repeats):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    result = engine.generate(prompt, new_tokens)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
                outputs[mode] = result.tokens
                speeds[mode] = len(result.tokens) / statistics.median(times)
        finally:
            if controller is not None:
                controller.close()
        rows.append({"bench": "e2e", "pair": name, "new_tokens": new_tokens,
                     "target_only_tok_s": speeds["target-only"], "llmcad_tok_s": speeds["llmcad"],
                     "llmcad_vs_target_only": speeds["llmcad"] / speeds["target-only"],
                     "lossless": outputs["llmcad"] == outputs["target-only"]})
    return rows


BENCHES = {"tree_plan": bench_tree_plan, "h2d": bench_h2d, "timeline": bench_timeline,
           "streamed_pass": bench_streamed_pass, "e2e": bench_e2e}


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
                print(json.dumps({k: v for k, v in row.items() if k != "intervals"}))
                rows.append(row)
        except Exception as exc:  # one failing bench must not hide the others' figures
            traceback.print_exc()
            row = {"bench": name, "error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(row))
            rows.append(row)
        if args.json_out:  # after every bench: a stage killed by its timeout keeps what it measured
            with open(args.json_out, "w") as sink:
                json.dump(rows, sink, indent=1)
    print_table(rows)
    return 1 if any("error" in row for row in rows) else 0


def print_table(rows):
    print("\n| bench | configuration | figure |\n| --- | --- | --- |")
    for row in rows:
        config = {k: v for k, v in row.items() if k not in ("bench", "intervals") and not isinstance(v, float)}
        figures = {k: round(v, 3) for k, v in row.items() if isinstance(v, float)}
        print(f"| {row['bench']} | {config} | {figures} |")


if __name__ == "__main__":
    raise SystemExit(main())
