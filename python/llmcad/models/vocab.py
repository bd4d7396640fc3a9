"""Draft vocabulary pruning: the draft's output layer restricted to the N most frequent tokens.

The draft then proposes only tokens of that set: its output layer is an nn.Linear holding the N kept
rows of the full one (:func:`prune_output_layer`, copied once with ``index_select``; an untied full
layer is dropped), and the drafter maps its top-k row ids back to token ids through the sorted id
tensor returned alongside. The target's verification never reads the draft's probabilities, so the
output stays exact (greedy and sampled); only acceptance can change.

Which tokens: a token's rank is its frequency in a calibration corpus (:func:`calibration_texts`:
``pydoc_data/topics.py``, English prose, then the top-level modules of the Python standard library,
in name order; no evaluation set), ties and unseen tokens by id (a BPE vocabulary's ids follow its
merge order, roughly its training frequency). The ranking of a tokenizer is keyed by a hash of its
vocabulary (:func:`tokenizer_key`): shipped as package data for the Qwen2.5 tokenizer
(``models/data/draft_vocab/KEY.npy``, written by :func:`write_ranking`); for any other tokenizer it is
computed from the corpus on first use (a few seconds) and cached under ``$LLMCAD_HOME/draft-vocab``.
Special tokens and end-of-generation ids are always kept.

Part of llmcad.models: may use llmcad.streaming; must not import llmcad.speculative, llmcad.bench or the engine.
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from pathlib import Path

import numpy as np
import torch

from llmcad.errors import ModelLoadError

SHIPPED = Path(__file__).parent / "data" / "draft_vocab"


def parse_draft_vocab(value, name: str = "draft_vocab") -> int | None:
    """None for the full vocabulary (None, 0, "none", "full"), else a positive int N; ValueError naming
    ``name`` for anything else."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "full", "0")):
        return None
    bad = ValueError(f"{name}={value!r}: expected a number of tokens, 0 or 'none' (the full vocabulary)")
    if isinstance(value, (bool, float)):
        raise bad
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise bad from None
    if n < 0:
        raise bad
    return n or None


def tokenizer_key(tokenizer) -> str:
    """16 hex digits identifying a tokenizer's vocabulary (token text -> id, added tokens included)."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:16]


def calibration_texts() -> list:
    """The calibration corpus: ``pydoc_data/topics.py`` then the standard library's top-level modules."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / "pydoc_data" / "topics.py"] + sorted(stdlib.glob("*.py"))
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files if f.is_file()]
    if not texts:
        raise ModelLoadError(f"draft vocabulary: no calibration corpus (no Python sources under {stdlib}) to "
                             "rank this tokenizer's tokens; use the full vocabulary (draft_vocab=None)")
    return texts


def corpus_ranking(tokenizer, texts=None) -> np.ndarray:
    """Ids of the tokens seen in the corpus, most frequent first (ties: lower id first), int32."""
    encoded = tokenizer(texts if texts is not None else calibration_texts(), add_special_tokens=False)["input_ids"]
    ids = np.concatenate([np.asarray(e, dtype=np.int64) for e in encoded if len(e)])
    counts = np.bincount(ids)
    seen = np.flatnonzero(counts)
    return seen[np.argsort(-counts[seen], kind="stable")].astype(np.int32)


def write_ranking(tokenizer, directory=SHIPPED) -> Path:
    """Compute this tokenizer's ranking and store it as ``directory/KEY.npy`` (the shipped data)."""
    path = Path(directory) / f"{tokenizer_key(tokenizer)}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, corpus_ranking(tokenizer))
    os.replace(tmp, path)
    return path


def ranking(tokenizer) -> np.ndarray:
    """The tokenizer's ranked ids: the shipped file, else the cached one, else computed and cached."""
    from llmcad.models.catalog import cache_dir

    key = tokenizer_key(tokenizer)
    for path in (SHIPPED / f"{key}.npy", cache_dir() / "draft-vocab" / f"{key}.npy"):
        if path.is_file():
            return np.load(path)
    return np.load(write_ranking(tokenizer, cache_dir() / "draft-vocab"))


def kept_ids(tokenizer, n: int, rows: int, always=()) -> torch.Tensor:
    """Sorted int64 ids of the ``n`` tokens the draft may propose, out of its ``rows`` output rows: the
    special tokens and ``always`` (end-of-generation ids), then the ranking, then unseen ids in order."""
    if n <= 0:
        raise ValueError(f"draft_vocab={n}: expected a positive number of tokens")
    special = [int(i) for i in list(tokenizer.all_special_ids) + list(always) if 0 <= int(i) < rows]
    special += [int(i) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
                if getattr(t, "special", False) and 0 <= int(i) < rows]
    keep = dict.fromkeys(special)
    if len(keep) > n:
        raise ValueError(f"draft_vocab={n}: fewer than the tokenizer's {len(keep)} special and end-of-generation "
                         "tokens, which the draft always keeps")
    ranked = ranking(tokenizer)
    for i in ranked[ranked < rows].tolist():
        if len(keep) >= n:
            break
        keep.setdefault(i)
    chosen = np.zeros(rows, dtype=bool)
    chosen[list(keep)] = True
    if len(keep) < n:  # unseen tokens by id: take the first ones not yet chosen
        chosen[np.flatnonzero(~chosen)[:n - len(keep)]] = True
    return torch.from_numpy(np.flatnonzero(chosen)).to(torch.long)


def pruned_head(model, ids: torch.Tensor) -> torch.nn.Linear:
    """An nn.Linear holding rows ``ids`` of ``model``'s output layer (a new [N, hidden] tensor)."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or not hasattr(model, "lm_head"):
        raise ModelLoadError(f"{type(model).__name__}: draft vocabulary pruning needs an nn.Linear lm_head")
    weight = head.weight.detach()
    ids = ids.to(weight.device)
    pruned = torch.nn.Linear(weight.shape[1], len(ids), bias=head.bias is not None, device="meta")
    pruned.weight = torch.nn.Parameter(weight.index_select(0, ids), requires_grad=False)
    if head.bias is not None:
        pruned.bias = torch.nn.Parameter(head.bias.detach().index_select(0, ids), requires_grad=False)
    return pruned


def prune_output_layer(model, ids: torch.Tensor) -> None:
    """Replace ``model.lm_head`` by :func:`pruned_head` (a full layer tied to the input embeddings stays
    as those, an untied one is dropped)."""
    model.lm_head = pruned_head(model, ids)
    untie(model.config)  # transformers must never tie the [N, hidden] rows back


def untie(config) -> None:
    """Mark ``config`` (and its text config) untied: a replaced output layer must never be tied back to
    the input embeddings."""
    config.tie_word_embeddings = False
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    if text is not None and text is not config:
        text.tie_word_embeddings = False


def pruned_head_bytes(config, n: int, dtype) -> int:
    """Bytes the pruned output layer adds to a draft of ``config`` (negative: an untied head shrinks)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    row = text.hidden_size * torch.empty((), dtype=dtype).element_size()
    if getattr(text, "tie_word_embeddings", False):
        return n * row
    return (n - text.vocab_size) * row
