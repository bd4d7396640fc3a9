"""Committing a verified path into a transformers DynamicCache.

transformers 5.x has no API to keep chosen positions (``crop`` only drops a tail), so a commit
gathers each layer's keys/values along the sequence dimension into contiguous slots. Every decision
(bounds, crop or gather) is made on host indices, so a commit on a CUDA cache never waits for the device.

Part of llmcad.speculative: must not import llmcad.streaming, llmcad.models, llmcad.bench or the engine.
"""
from __future__ import annotations

import numpy as np
import torch


def cache_length(cache) -> int:
    """Number of cached positions (0 for a fresh cache)."""
    return int(cache.get_seq_length()) if cache is not None else 0


def commit(cache, keep, device_keep=None) -> None:
    """Keep only the slots ``keep`` (host int64 indices, increasing) of every layer, in that order.

    Cache layers are [batch, kv_heads, seq, head_dim]; after the call each holds len(keep) positions.
    A ``keep`` that is a plain prefix ``0..k-1`` is a crop (no copy). ``device_keep``: the same indices
    already on the cache's device (made there from the acceptance walk), used for the gather instead
    of uploading ``keep``.
    """
    if getattr(keep, "is_cuda", False):
        raise ValueError("keep must be host indices (list, NumPy array or CPU tensor); pass device indices "
                         "as device_keep")
    keep = np.asarray(keep.numpy() if isinstance(keep, torch.Tensor) else keep, dtype=np.int64).reshape(-1)
    length = cache_length(cache)
    k = keep.size
    if k and (keep[0] < 0 or keep[-1] >= length or np.any(np.diff(keep) <= 0)):
        raise ValueError(f"commit slots must increase within [0, {length}), got {keep[0]}..{keep[-1]}")
    if device_keep is not None and tuple(device_keep.shape) != (k,):
        raise ValueError(f"device_keep has shape {tuple(device_keep.shape)}, keep has {k} slots")
    if k == length:
        return
    if k == 0 or keep[-1] == k - 1:  # increasing from >= 0: exactly 0..k-1
        cache.crop(k - length)  # transformers 5.x: a negative count of positions to drop
        return
    on_device = {}  # device -> the indices there
    if device_keep is not None:
        on_device[device_keep.device] = device_keep
    for layer in cache.layers:
        if layer.keys is None or layer.keys.numel() == 0:
            continue
        device = layer.keys.device
        if device not in on_device:
            from llmcad.speculative.tree import host_to_device

            on_device[device] = host_to_device(keep, device)
        index = on_device[device]
        layer.keys = layer.keys.index_select(-2, index)
        layer.values = layer.values.index_select(-2, index)
