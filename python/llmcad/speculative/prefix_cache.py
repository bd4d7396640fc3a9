"""Prompt prefix cache: the draft's and the target's KV of earlier generations, kept between calls so a
prompt that starts with an earlier prompt (a conversation's next turn, a shared system prompt) prefills
only the rest.

An entry holds ``tokens`` and the two DynamicCaches whose positions ``0..len(tokens)-1`` hold exactly
those tokens' keys and values. A lookup takes the entry with the longest common prefix with the new
prompt, at most ``len(prompt) - 1`` tokens (the prompt's last token is the first pass's root, which must
run). Reuse is lossless: a token's keys and values depend only on the tokens before it.

Memory: entries are counted in KV positions (each position holds one token in both caches,
``position_bytes`` bytes). With a ``pool`` (the positions the memory budget leaves the KV caches), the
entries kept during a generation plus the positions that generation may use stay within it: a lookup
evicts least recently used entries until the generation's need fits, so reuse never shortens a
generation and never lets memory grow past the budget.

Part of llmcad.speculative: must not import llmcad.streaming, llmcad.models, llmcad.bench or the engine.
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_ENTRIES = 4


@dataclass
class PrefixEntry:
    """``tokens`` whose keys/values ``target`` and ``draft`` (None: a mode without a draft) hold."""

    tokens: list
    target: object
    draft: object | None

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class Reuse:
    """Caches a generation starts from: their first ``tokens`` positions hold the prompt's first tokens."""

    tokens: int
    target: object
    draft: object | None


def common_prefix(a, b) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    """Up to ``max_entries`` entries, least recently used first; ``pool``: KV positions shared by the
    entries and the running generation (None: unbounded); ``position_bytes``: bytes of one position in
    both caches (for reporting)."""

    def __init__(self, pool: int | None = None, max_entries: int = DEFAULT_MAX_ENTRIES, position_bytes: int = 0):
        if max_entries < 1:
            raise ValueError(f"max_entries={max_entries}: expected an int >= 1")
        self.pool, self.max_entries, self.position_bytes = pool, max_entries, position_bytes
        self.entries: list[PrefixEntry] = []  # least recently used first

    @property
    def stored_positions(self) -> int:
        return sum(len(e) for e in self.entries)

    @property
    def stored_bytes(self) -> int:
        return self.stored_positions * self.position_bytes

    def room(self) -> int | None:
        """KV positions a generation may use beside the entries kept (None: unbounded)."""
        return None if self.pool is None else self.pool - self.stored_positions

    def take(self, ids, need: int, with_draft: bool) -> Reuse | None:
        """Caches for a generation of prompt ``ids`` that may use ``need`` KV positions, starting from the
        longest common prefix with an entry (None: no entry shares a token, start empty). An entry that
        is wholly a prefix of ``ids`` is handed over; one that matches in part is copied up to the match
        when the pool can keep it beside the generation, else handed over cut to the match. Least
        recently used entries are evicted until ``need`` fits beside the rest."""
        best, k = self._longest_match(ids, with_draft)
        if best is None:
            self._evict_for(need)
            return None
        keep_source = k < len(best) and (self.pool is None or len(best) + need <= self.pool)
        self.entries.remove(best)
        if keep_source:
            self.entries.append(best)  # most recently used
        self._evict_for(need, protect=best if keep_source else None)  # never evicts it: it fits beside need
        if keep_source:
            return Reuse(k, copy_prefix(best.target, k), copy_prefix(best.draft, k) if with_draft else None)
        # a view: the first forward's concatenation copies it and frees the rest
        return Reuse(k, cut(best.target, k, release=False), cut(best.draft, k, release=False) if with_draft else None)

    def put(self, tokens, target, draft) -> None:
        """Keep the caches of a finished generation, cut to ``tokens`` (what both hold, committed text
        only). Entries that are a prefix of ``tokens`` go (this one serves every prompt they would); then
        least recently used entries are evicted while there are too many or they overflow the pool."""
        tokens = list(tokens)
        if not tokens:
            return
        entry = PrefixEntry(tokens, cut(target, len(tokens)), cut(draft, len(tokens)))
        self.entries = [e for e in self.entries
                        if not (common_prefix(e.tokens, tokens) == len(e) and (e.draft is None or draft is not None))]
        self.entries.append(entry)
        while len(self.entries) > self.max_entries or (self.pool is not None and self.stored_positions > self.pool):
            self.entries.pop(0)

    def clear(self) -> None:
        self.entries = []

    def _longest_match(self, ids, with_draft: bool):
        """(entry, shared tokens) with the most tokens shared with ``ids[:-1]``; (None, 0) when none."""
        best, k = None, 0
        for entry in self.entries:
            if with_draft and entry.draft is None:
                continue
            n = common_prefix(entry.tokens, ids[:-1])
            if n > k:
                best, k = entry, n
        return best, k

    def _evict_for(self, need: int, protect=None) -> None:
        """Evict least recently used entries (``protect`` last) until ``need`` positions fit beside them."""
        if self.pool is None:
            return
        while self.entries and self.stored_positions + need > self.pool:
            victim = next((e for e in self.entries if e is not protect), self.entries[0])
            self.entries.remove(victim)


def cut(cache, k: int, release: bool = True):
    """``cache`` (None passes through) cut to its first ``k`` positions, in place. ``release``: copy
    what is kept, so the dropped positions' memory is freed now (a slice keeps the whole tensor alive)."""
    if cache is None:
        return None
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is None or keys.numel() == 0 or keys.shape[-2] <= k:
            continue
        keys, values = keys[..., :k, :], layer.values[..., :k, :]
        layer.keys, layer.values = (keys.clone(), values.clone()) if release else (keys, values)
    return cache


def copy_prefix(cache, k: int):
    """A new DynamicCache holding a copy of the first ``k`` positions of ``cache``."""
    from transformers import DynamicCache

    data = [(layer.keys[..., :k, :], layer.values[..., :k, :]) for layer in cache.layers]
    return DynamicCache(ddp_cache_data=data)  # update() concatenates: the slices are copied
