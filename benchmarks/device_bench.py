"""GPU benchmarks for scripts/device_check.sh; prints one JSON line per figure and a table last.

Every figure is a ratio against a baseline measured in the same process: tree-plan kernels (GPU
against the C++ CPU kernels), H2D streaming (against a plain pinned copy of the same bytes), a
streamed target pass (wall against max(IO, compute)) and end-to-end tokens/s (llmcad against
target-only). The streamed figures use a random fp16 Qwen2-shaped model of about 360 MB made here and
saved to $LLMCAD_BENCH_MODEL (default /tmp/llmcad-device-model): no downloads, no real model.

    python benchmarks/device_bench.py [--only tree_plan h2d streamed_pass e2e] [--json-out FILE]
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

from llmcad.spec import tree

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


def bench_h2d(repeats=5):
    """Streamer (page cache warm, buffered reads) -> pinned ring -> device slots, against a plain pinned
    torch copy (cudaMemcpyAsync) of the same bytes in the same layer-sized pieces."""
    from llmcad.streaming.weights import load_index

    _, target_dir = build_model()
    index = load_index(target_dir)
    layers = list(range(index.num_layers))
    _feed_pass(index, layers, "copy", direct=False, evict=False)  # warm: page cache, allocator
    sizes = [index.layer_bytes(i) for i in layers]
    pinned = torch.empty(max(sizes), dtype=torch.uint8, pin_memory=True)
    slots = [torch.empty(max(sizes), dtype=torch.uint8, device="cuda") for _ in range(2)]

    def plain():
        for k, n in enumerate(sizes):
            slots[k % 2][:n].copy_(pinned[:n], non_blocking=True)

    plain()
    plain_s = statistics.median(_sync_timed(plain) for _ in range(repeats))
    ring_s = statistics.median(_feed_pass(index, layers, "copy", direct=False, evict=False)[0] for _ in range(repeats))
    total = sum(sizes)
    return [{"bench": "h2d_stream", "bytes": total, "plain_pinned_gbps": total / plain_s / 1e9,
             "streamed_gbps": total / ring_s / 1e9, "streamed_vs_plain": plain_s / ring_s}]


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
    mask = tree.attention_mask(torch.as_tensor(parents, device="cuda"), prefix_len, dtype=resident.dtype,
                               device="cuda")
    positions = tree.position_ids(torch.as_tensor(parents, device="cuda"), prefix_len).view(1, -1)

    def run(model):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=prefix, past_key_values=cache, use_cache=True)
        torch.cuda.synchronize()
        return cache

    def tree_pass(model, cache):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)

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
    from llmcad.spec.policy import make_policy
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


BENCHES = {"tree_plan": bench_tree_plan, "h2d": bench_h2d, "streamed_pass": bench_streamed_pass, "e2e": bench_e2e}


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
        config = {k: v for k, v in row.items() if k not in ("bench",) and not isinstance(v, float)}
        figures = {k: round(v, 3) for k, v in row.items() if isinstance(v, float)}
        print(f"| {row['bench']} | {config} | {figures} |")


if __name__ == "__main__":
    raise SystemExit(main())
