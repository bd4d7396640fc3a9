"""One forward of a Hugging Face causal LM over cached keys + new tokens, with an explicit additive
4D mask and explicit position ids (the way both the draft and the target are called).

Logits are never materialised for more rows than needed at once: the decoder stack (``model.model``,
final norm included) gives the hidden states, and :class:`RowLogits` applies the output head to them
a chunk of rows at a time, in the compute dtype (a model whose causal-LM forward does more than the
head, e.g. soft-capping, gets its logits from that forward instead). A long run of tokens with no
logits needed (a prompt) is cached in passes of at most ``rows`` tokens (:func:`prefill`).

Part of llmcad.speculative: must not import llmcad.streaming, llmcad.models, llmcad.bench or the engine.
"""
from __future__ import annotations

import inspect

import numpy as np
import torch

from llmcad.speculative import kv, tree

_CACHE_KWARG = {}  # model class -> "cache" (transformers >= 5.24) or "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` for the KV-cache argument of ``model``'s forward: ``cache`` from transformers
    5.24 on (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    cls = type(model)
    if cls not in _CACHE_KWARG:
        params = inspect.signature(cls.forward).parameters
        _CACHE_KWARG[cls] = "cache" if "cache" in params else "past_key_values"
    return {_CACHE_KWARG[cls]: cache}


DEFAULT_CHUNK_ROWS = 64  # logits rows at once when the caller does not size them

# config fields that make a causal-LM forward more than ``lm_head(hidden)``: its own forward computes those
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def forward_with_mask(model, cache, input_ids, position_ids, mask, logits_to_keep: int = 0,
                      chunk_rows: int | None = None) -> "RowLogits":
    """Run ``model`` on ``input_ids`` (q tokens) after the ``cache``'s keys and append their keys/values.

    ``position_ids``: [q] int64; ``mask``: float additive [1, 1, q, cache_len + q] (0 = visible,
    -inf = hidden; never bool: bool masks are silently wrong with eager attention).
    Returns the logits of the last ``logits_to_keep`` tokens (all q when 0) as :class:`RowLogits`,
    computed ``chunk_rows`` rows at a time when read.
    """
    device = model.get_input_embeddings().weight.device
    ids = _long_on(input_ids, device).view(1, -1)
    positions = _long_on(position_ids, device).view(1, -1)
    keep = logits_to_keep or ids.shape[1]
    with torch.inference_mode():
        if not _plain_head(model):
            out = model(input_ids=ids, attention_mask=_on(mask, device), position_ids=positions, use_cache=True,
                        logits_to_keep=keep, **cache_kwargs(model, cache))
            return RowLogits(None, out.logits[0], chunk_rows)
        out = model.model(input_ids=ids, attention_mask=_on(mask, device), position_ids=positions, use_cache=True,
                          **cache_kwargs(model.model, cache))
    return RowLogits(model.lm_head, out.last_hidden_state[0, -keep:], chunk_rows)


class RowLogits:
    """Float logits of ``n`` rows, made a chunk of rows at a time: ``chunks()`` yields ``(first row,
    float32 [rows, vocab])``, each chunk freed before the next is made. ``head``: the output layer applied
    to ``hidden`` [n, hidden] (None: ``hidden`` are logits already, in the model's dtype)."""

    def __init__(self, head, hidden: torch.Tensor, chunk_rows: int | None = None):
        self.head, self.hidden = head, hidden
        self.chunk_rows = max(1, chunk_rows or DEFAULT_CHUNK_ROWS)
        vocab = hidden.shape[-1] if head is None else head.out_features
        self.shape = (hidden.shape[0], vocab)

    def __len__(self) -> int:
        return self.shape[0]

    def chunks(self):
        for start in range(0, self.shape[0], self.chunk_rows):
            rows = self.hidden[start:start + self.chunk_rows]
            if self.head is not None:
                with torch.inference_mode():
                    rows = self.head(rows)
            yield start, rows.float()

    def select(self, rows) -> "RowLogits":
        """The logits of the rows ``rows`` (ids, in that order) alone: the output layer runs on them only."""
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.hidden.device)
        return RowLogits(self.head, self.hidden.index_select(0, index), self.chunk_rows)

    def full(self) -> torch.Tensor:
        """Every row's logits at once, float32 [n, vocab] (tests and small vocabularies)."""
        return torch.cat([rows for _, rows in self.chunks()]) if self.shape[0] else torch.empty(self.shape)


def _plain_head(model) -> bool:
    """Whether the causal LM's logits are ``model.lm_head(model.model(...).last_hidden_state)``."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head = getattr(model, "lm_head", None)  # an nn.Linear, or a packed one (llmcad.models.draft_head)
    return (isinstance(head, torch.nn.Module) and hasattr(head, "out_features") and hasattr(model, "model")
            and not any(getattr(config, name, None) not in (None, 1, 1.0) for name in _HEAD_EXTRAS))


def prefill(model, cache, tokens, rows: int, stop=None) -> None:
    """Append ``tokens`` (causal, after the cache's keys) to ``cache`` in passes of at most ``rows``
    tokens, computing no logits: a long prompt costs the activations of ``rows`` tokens at a time.
    ``stop`` (a threading.Event): once set, no further pass starts (InterruptedError); the cache then
    holds the passes that ran."""
    weight = model.get_input_embeddings().weight
    device = weight.device
    for start in range(0, len(tokens), rows):
        if stop is not None and stop.is_set():
            raise InterruptedError("the prefill was stopped")
        chunk = list(tokens[start:start + rows])
        cache_len = kv.cache_length(cache)
        mask = causal_rows(cache_len, len(chunk), cache_len + len(chunk), weight.dtype, device)
        positions = torch.arange(cache_len, cache_len + len(chunk))
        with torch.inference_mode():
            body = model.model if hasattr(model, "model") else model
            body(input_ids=_long_on(chunk, device).view(1, -1), attention_mask=_on(mask, device),
                 position_ids=_long_on(positions, device).view(1, -1), use_cache=True, **cache_kwargs(body, cache))


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
    keys = prefix + tree_mask.shape[2]
    mask = torch.cat([causal_rows(cache_len, num_pending, keys, dtype, build), tree_mask], dim=2)
    positions = torch.cat([torch.arange(cache_len, prefix, device=build), tree_pos])
    return mask.to(device), positions


def causal_rows(cache_len: int, count: int, keys: int, dtype, device) -> torch.Tensor:
    """Additive mask [1, 1, count, keys] of ``count`` causal tokens after ``cache_len`` keys: row i sees
    keys 0..cache_len + i (0), nothing after (-inf)."""
    rows = torch.arange(count, device=device).view(-1, 1)
    cols = torch.arange(keys, device=device).view(1, -1)
    mask = torch.zeros((count, keys), dtype=dtype, device=device)
    mask.masked_fill_(cols > cache_len + rows, float("-inf"))
    return mask.view(1, 1, count, keys)
