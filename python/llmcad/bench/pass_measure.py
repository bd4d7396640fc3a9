"""One cold streamed target pass over a token tree, measured against IO and compute alone.

Per repeat, in the same process and on the same inputs:
- compute: the tree pass with every layer resident (no IO);
- io: the streamer alone reading the same streamed layers (acquire/release in order, no compute);
- wall: the tree pass of the streamed target, cold (page cache evicted, nothing prefetched).
``overlap_ratio = wall / max(io, compute)`` (medians): 1.0 means IO is perfectly hidden behind compute
or the other way round; 2.0 means they ran back to back. ``overlap_ratio_paired`` is the median of the
per-repeat ratios (each repeat's three timings are taken back to back, so it is steadier on a busy host).

Part of llmcad.bench (tools): may import the whole package; nothing outside llmcad.bench imports it.
"""
from __future__ import annotations

import copy
import statistics
import time

import numpy as np
import torch

from llmcad.speculative.forward import cache_kwargs
from llmcad.streaming.budget import plan_placement, resident_placement
from llmcad.models.loading import draft_footprint
from llmcad.streaming.streamed import load_streamed_target, plan_budget
from llmcad.streaming.weights import load_index

def measure(target, *, memory_budget=None, draft=None, tree_nodes=32, prefix_len=64, repeats=5, num_buffers=2,
            backend="auto", dtype=None, seed=0, bandwidth_cap=None) -> dict:
    """Median wall/io/compute seconds of a cold tree pass; see the module docstring.
    ``bandwidth_cap``: bytes/s for the streamer (None: uncapped). ``draft``: with ``memory_budget``,
    the target is placed as the engine places it beside this draft (the runtime floor, the draft, both
    KV caches and the pass working set counted); without, the budget holds the target alone."""
    if tree_nodes < 1 or repeats < 1:
        raise ValueError("--tree-nodes and --repeats must be >= 1")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    index = load_index(target)
    placement = _placement(target, index, memory_budget, draft, dtype, num_buffers)
    options = {"backend": backend, "bandwidth_cap": bandwidth_cap}
    resident = load_streamed_target(target, placement=resident_placement(index), dtype=dtype).model
    streamed = load_streamed_target(target, placement=placement, dtype=dtype, streamer_options=options)
    try:
        inputs = _tree_inputs(resident, tree_nodes, prefix_len, seed)
        _pass(resident, inputs)  # warm-up: kernels, allocator
        _pass(streamed.model, inputs)
        walls, ios, computes = [], [], []
        for _ in range(repeats):
            computes.append(_timed(lambda: _pass(resident, inputs)))
            ios.append(_io_alone(index, placement, options))
            walls.append(_cold_streamed_pass(streamed, index, inputs))
        stats = streamed.streamer.stats() if streamed.streamer is not None else {}
    finally:
        streamed.close()
    wall, io, compute = (statistics.median(x) for x in (walls, ios, computes))
    paired = statistics.median(w / max(i, c) for w, i, c in zip(walls, ios, computes))
    return {"wall_s": wall, "io_s": io, "compute_s": compute, "overlap_ratio": wall / max(io, compute),
            "overlap_ratio_paired": paired, "walls_s": walls, "ios_s": ios, "computes_s": computes, "tree_nodes": tree_nodes,
            "prefix": prefix_len, "resident_layers": len(placement.resident_layers),
            "streamed_layers": len(placement.streamed_layers), "streamed_layer_ids": list(placement.streamed_layers),
            "bytes_per_pass": placement.bytes_per_pass,
            "num_buffers": placement.num_buffers, "draft": str(draft) if draft is not None else None, "backend": stats.get("backend"), "direct": stats.get("direct"),
            "dtype": str(resident.dtype).replace("torch.", ""), "torch_threads": torch.get_num_threads()}


def _placement(target, index, memory_budget, draft, dtype, num_buffers):
    if memory_budget is not None and draft is not None:
        config, draft_bytes, draft_dtype = draft_footprint(draft, dtype)
        return plan_budget(target, memory_budget=memory_budget, draft_config=config, draft_bytes=draft_bytes,
                           draft_dtype=draft_dtype, dtype=dtype, num_buffers=num_buffers)
    budget = memory_budget if memory_budget is not None else 1 << 50
    return plan_placement(index, memory_budget=budget, dtype=dtype, num_buffers=num_buffers,
                          max_resident_layers=None if memory_budget is not None else 0)


def _tree_inputs(model, n, prefix_len, seed):
    """A random tree (fixed seed), its mask and positions, and a KV cache already holding the prefix."""
    from transformers import DynamicCache

    from llmcad.speculative import tree

    rng = np.random.default_rng(seed)
    parents = [-1] + [int(rng.integers(0, i)) for i in range(1, n)]
    vocab = model.config.vocab_size
    prefix = torch.as_tensor(rng.integers(0, vocab, (1, prefix_len)))
    cache = DynamicCache(config=model.config)
    if prefix_len:
        with torch.no_grad():
            model(input_ids=prefix, **cache_kwargs(model, cache), use_cache=True)
    return {"input_ids": torch.as_tensor(rng.integers(0, vocab, (1, n))),
            "attention_mask": tree.attention_mask(parents, prefix_len, dtype=model.dtype),
            "position_ids": torch.as_tensor(tree.position_ids(parents, prefix_len))[None],
            "cache": cache}


def _pass(model, inputs):
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                     position_ids=inputs["position_ids"], **cache_kwargs(model, copy.deepcopy(inputs["cache"])),
                     use_cache=True).logits


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _evict(index):
    from llmcad.streaming.streamer import evict_from_page_cache

    for path in index.files:
        evict_from_page_cache(path)


def _io_alone(index, placement, options) -> float:
    """Seconds the streamer alone takes to read the streamed layers cold, in order."""
    from llmcad.streaming.streamer import WeightStreamer

    if not placement.streamed_layers:
        return 0.0
    with WeightStreamer(index.files, buffer_bytes=placement.buffer_bytes, num_buffers=placement.num_buffers,
                        **options) as streamer:
        ids = [streamer.add_layer(index.layer_ranges(i).ranges) for i in placement.streamed_layers]
        _evict(index)
        start = time.perf_counter()
        for sid in ids:
            streamer.prefetch(sid)
        for sid in ids:
            streamer.acquire(sid)
            streamer.release(sid)
        return time.perf_counter() - start


def _cold_streamed_pass(streamed, index, inputs) -> float:
    """One streamed pass with nothing prefetched and the files out of the page cache."""
    streamed.drop_prefetch()
    _evict(index)
    cache = copy.deepcopy(inputs["cache"])
    start = time.perf_counter()
    with torch.no_grad():
        streamed.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       position_ids=inputs["position_ids"], **cache_kwargs(streamed.model, cache), use_cache=True)
    return time.perf_counter() - start

