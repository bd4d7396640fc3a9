"""Committing a verified path into a transformers DynamicCache.

transformers 5.x has no API to keep chosen positions (``crop`` only drops a tail), so a commit
gathers each layer's keys/values along the sequence dimension into contiguous slots.
"""
from __future__ import annotations

import torch


def cache_length(cache) -> int:
    """Number of cached positions (0 for a fresh cache)."""
    return int(cache.get_seq_length()) if cache is not None else 0


def commit(cache, keep) -> None:
    """Keep only the slots ``keep`` (int64 indices, increasing) of every layer, in that order.

    Cache layers are [batch, kv_heads, seq, head_dim]; after the call each holds len(keep) positions.
    A ``keep`` that is a plain prefix ``0..k-1`` is a crop (no copy).
    """
    keep = torch.as_tensor(keep, dtype=torch.long)
    length = cache_length(cache)
    k = keep.numel()
    if k and (int(keep[0]) < 0 or int(keep[-1]) >= length):
        raise ValueError(f"commit slots must lie in [0, {length}), got {int(keep[0])}..{int(keep[-1])}")
    if k == length:
        return
    if torch.equal(keep, torch.arange(k, device=keep.device)):
        cache.crop(k - length)  # transformers 5.x: a negative count of positions to drop
        return
    for layer in cache.layers:
        if layer.keys is None or layer.keys.numel() == 0:
            continue
        index = keep.to(layer.keys.device)
        layer.keys = layer.keys.index_select(-2, index)
        layer.values = layer.values.index_select(-2, index)
