"""Prompt lookup: candidate continuations copied from the text so far, with no draft forward.

As transformers' ``prompt_lookup_num_tokens`` and llama.cpp's lookup decoding: the last ``n`` tokens
(n from ``max_ngram`` down to 1) are looked up among the earlier tokens (prompt plus generated text),
and the tokens that followed their most recent earlier occurrence are proposed, up to ``max_tokens``.
On code, names, signatures and docstrings repeat, so these copies are often what the target writes.

An index maps every n-gram to the end of its most recent occurrence that has a following token, kept
up to date as tokens are appended, so a lookup costs O(max_ngram) dictionary reads, whatever the length.

Part of llmcad.speculative: must not import llmcad.streaming, llmcad.models, llmcad.bench or the engine.
"""
from __future__ import annotations

MAX_NGRAM = 3  # longest suffix looked up
MAX_TOKENS = 10  # longest continuation proposed


class PromptLookup:
    """The committed tokens and an n-gram index over them."""

    def __init__(self, tokens=(), max_ngram: int = MAX_NGRAM, max_tokens: int = MAX_TOKENS):
        if max_ngram < 1 or max_tokens < 1:
            raise ValueError(f"max_ngram={max_ngram}, max_tokens={max_tokens}: expected both >= 1")
        self.max_ngram, self.max_tokens = max_ngram, max_tokens
        self.tokens: list = []
        self._ends = [{} for _ in range(max_ngram + 1)]  # [n]: n-gram tuple -> end of latest occurrence
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens) -> None:
        """Append committed tokens; the n-grams they complete the context of get indexed."""
        for token in tokens:
            end = len(self.tokens)  # n-grams ending here now have a following token (``token``)
            for n in range(1, min(self.max_ngram, end) + 1):
                self._ends[n][tuple(self.tokens[end - n:end])] = end
            self.tokens.append(int(token))

    def propose(self, suffix=()) -> list:
        """Continuations of the committed tokens followed by ``suffix`` (e.g. the next tree's root):
        ``[(n, tokens)]``, one per suffix length n from ``max_ngram`` down to 1 whose most recent earlier
        occurrence is found, each distinct and at most ``max_tokens`` long, longest match first."""
        suffix = [int(t) for t in suffix]
        indexed = len(self.tokens)
        total = indexed + len(suffix)
        # the last max_ngram committed tokens and the suffix: every key, and every end after the index's
        tail_start = max(0, indexed - self.max_ngram)
        tail = self.tokens[tail_start:] + suffix
        out, seen = [], set()
        for n in range(min(self.max_ngram, total - 1), 0, -1):
            key = tail[-n:]
            end = _latest_in_suffix(tail, n, indexed - tail_start)  # more recent than any indexed one
            end = end + tail_start if end is not None else self._ends[n].get(tuple(key))
            if end is None:
                continue
            continuation = tuple(self._window(suffix, end, self.max_tokens))
            if continuation and continuation not in seen:
                seen.add(continuation)
                out.append((n, list(continuation)))
        return out

    def _window(self, suffix: list, start: int, count: int) -> list:
        """(committed tokens + ``suffix``)[start:start + count], without joining the two."""
        head = self.tokens[start:start + count]
        return head + suffix[max(0, start - len(self.tokens)):][:count - len(head)]


def _latest_in_suffix(context: list, n: int, indexed: int):
    """End of the latest occurrence of ``context``'s last n tokens that ends at or after ``indexed``
    (the index holds only earlier ends) and before the last position; None when there is none."""
    key = context[-n:]
    for end in range(len(context) - 1, max(indexed, n) - 1, -1):
        if context[end - n:end] == key:
            return end
    return None
