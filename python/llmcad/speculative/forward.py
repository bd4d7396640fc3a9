"""One forward of a Hugging Face causal LM over cached keys + new tokens, with an explicit additive
4D mask and explicit position ids (the way both the draft and the target are called).

Part of llmcad.speculative: must not import llmcad.streaming, llmcad.models, llmcad.bench or the engine.
"""
from __future__ import annotations

import inspect

import numpy as np
import torch

from llmcad.speculative import tree

_CACHE_KWARG = {}  # model class -> "cache" (transformers >= 5.24) or "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` for the KV-cache argument of ``model``'s forward: ``cache`` from transformers
    5.24 on (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    cls = type(model)
    if cls not in _CACHE_KWARG:
        params = inspect.signature(cls.forward).parameters
        _CACHE_KWARG[cls] = "cache" if "cache" in params else "past_key_values"
    return {_CACHE_KWARG[cls]: cache}


def forward_with_mask(model, cache, input_ids, position_ids, mask, logits_to_keep: int = 0) -> torch.Tensor:
    """Run ``model`` on ``input_ids`` (q tokens) after the ``cache``'s keys and append their keys/values.

    ``position_ids``: [q] int64; ``mask``: float additive [1, 1, q, cache_len + q] (0 = visible,
    -inf = hidden; never bool: bool masks are silently wrong with eager attention).
    Returns float logits [k, vocab] of the last ``logits_to_keep`` tokens (all q when 0).
    """
    device = model.get_input_embeddings().weight.device
    ids = _long_on(input_ids, device).view(1, -1)
    positions = _long_on(position_ids, device).view(1, -1)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=_on(mask, device), position_ids=positions, use_cache=True,
                    logits_to_keep=logits_to_keep, **cache_kwargs(model, cache))
    return out.logits[0].float()


def _long_on(values, device) -> torch.Tensor:
    """int64 ``values`` on ``device``; host lists go up without a host sync (pinned, non-blocking)."""
    if isinstance(values, torch.Tensor):
        return _on(values.to(torch.long), device)
    return tree.host_to_device(np.asarray(values, dtype=np.int64), device)


def _on(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device``; a host tensor goes to a CUDA device without a host sync (pinned staging)."""
    device = torch.device(device)
    if t.device == device or t.device.type == device.type == "cuda":
        return t.to(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def pending_tree_inputs(cache_len: int, num_pending: int, parents, dtype, device):
    """Mask and positions for ``num_pending`` causal tokens followed by a tree, after ``cache_len`` keys.

    Pending tokens are committed tokens the model has not cached yet (the prompt, in the first round):
    each sees the cache, the pending tokens up to itself, and no tree node. Tree rows are the tree's
    mask with prefix ``cache_len + num_pending``. Returns (mask [1,1,p+n,C+p+n], positions [p+n]).
    ``parents``: host data, or a :class:`llmcad.speculative.tree.DeviceTree` already uploaded to ``device``.
    """
    prefix = cache_len + num_pending
    if torch.device(device).type == "cuda":  # the CUDA kernels build the plan on the device (current stream)
        device_tree = parents if isinstance(parents, tree.DeviceTree) else tree.DeviceTree(parents, device)
        tree_mask = device_tree.attention_mask(prefix, dtype)
        tree_pos = device_tree.position_ids(prefix)
    else:
        tree_mask = tree.attention_mask(parents, prefix, dtype=dtype, device="cpu")
        tree_pos = torch.as_tensor(tree.position_ids(parents, prefix))
    if num_pending == 0:
        return tree_mask.to(device), tree_pos
    build = tree_mask.device  # the pending rows are made where the tree rows are
    n = tree_mask.shape[2]
    keys = prefix + n
    rows = torch.arange(num_pending, device=build).view(-1, 1)
    cols = torch.arange(keys, device=build).view(1, -1)
    pending_mask = torch.zeros((num_pending, keys), dtype=dtype, device=build)
    pending_mask.masked_fill_(cols > cache_len + rows, float("-inf"))
    mask = torch.cat([pending_mask.view(1, 1, num_pending, keys), tree_mask], dim=2)
    positions = torch.cat([torch.arange(cache_len, prefix, device=build), tree_pos])
    return mask.to(device), positions
