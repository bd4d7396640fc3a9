"""Prompt lookup's n-gram index against a NumPy brute-force search, at awkward sizes."""
from __future__ import annotations

import numpy as np
import pytest
from llmcad.speculative.lookup import PromptLookup


def reference(context, max_ngram, max_tokens) -> list:
    """For n = max_ngram..1: the tokens after the latest earlier occurrence of the last n tokens."""
    context = np.asarray(context, dtype=np.int64)
    out, seen = [], set()
    for n in range(min(max_ngram, len(context) - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(context[:-1], n)  # [len - n, n], start i ends i + n
        hits = np.flatnonzero((windows == context[-n:]).all(axis=1))
        if hits.size == 0:
            continue
        end = int(hits[-1]) + n
        continuation = tuple(int(t) for t in context[end:end + max_tokens])
        if continuation not in seen:
            seen.add(continuation)
            out.append((n, list(continuation)))
    return out


@pytest.mark.parametrize("length", [0, 1, 2, 3, 7, 64, 257])
@pytest.mark.parametrize("vocab", [1, 2, 5, 50])
@pytest.mark.parametrize("max_ngram,max_tokens", [(1, 1), (3, 10), (4, 3)])
def test_index_matches_brute_force(length, vocab, max_ngram, max_tokens):
    rng = np.random.default_rng(length * 1000 + vocab * 10 + max_ngram)
    tokens = rng.integers(0, vocab, size=length).tolist()
    lookup = PromptLookup(tokens[:length // 3], max_ngram, max_tokens)
    lookup.extend(tokens[length // 3:])  # in two parts, as prompt then generated text
    for suffix in ([], [int(rng.integers(0, vocab))], [tokens[-1]] if tokens else [0],
                   rng.integers(0, vocab, size=4).tolist()):  # matches and copies inside the suffix too
        assert lookup.propose(suffix) == reference(tokens + suffix, max_ngram, max_tokens), suffix


def test_incremental_extension_matches_building_at_once():
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, 4, size=120).tolist()
    lookup = PromptLookup()
    for i, token in enumerate(tokens):
        lookup.extend([token])
        assert lookup.propose([tokens[(i * 7) % len(tokens)]]) == reference(
            tokens[:i + 1] + [tokens[(i * 7) % len(tokens)]], 3, 10)


def test_copies_the_latest_occurrence():
    lookup = PromptLookup([1, 2, 3, 9, 9, 1, 2, 3, 4, 5, 6])
    # [6, 1, 2] never occurred; [1, 2] last at positions 5-6: copy what followed, into the suffix itself
    # ([2] alone finds the same continuation: proposed once)
    assert lookup.propose([1, 2]) == [(2, [3, 4, 5, 6, 1, 2])]
    assert lookup.propose([9]) == [(1, [1, 2, 3, 4, 5, 6, 9])]  # [9] last at position 4, not 3


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="max_ngram"):
        PromptLookup(max_ngram=0)
