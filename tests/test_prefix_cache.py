"""Prompt prefix reuse: a generate that starts from the KV of an earlier one (a conversation's next turn,
an edited history, a shared prefix) produces exactly what a fresh engine produces, in every mode,
resident and streamed, greedy and seeded; under a memory budget the kept entries and the running
generation stay within the budget's KV positions (entries are evicted by the plan)."""
from __future__ import annotations


import pytest
import torch
from transformers import DynamicCache

import pair_models
from llmcad import LLMCad
from llmcad.speculative import kv
from llmcad.speculative.policy import make_policy
from llmcad.speculative.prefix_cache import PrefixCache, common_prefix

MODES = ("llmcad", "tree", "chain", "target-only")
NEW = 10
FOLLOW_UPS = [" for i in range(10):", " The quick brown fox", " return a + b"]


def _engine(tiny_models, tokenizer, mode, **options):
    return LLMCad(tiny_models("qwen2", "shared"), tiny_models("qwen2", "target"), tokenizer, make_policy(mode),
                  **options)


def _conversation(engines, tokenizer, **generate_options):
    """Turns on every engine: each prompt is the last prompt, its answer and a follow-up. Returns each
    engine's results, turn by turn."""
    ids = list(tokenizer("def add(a, b):")["input_ids"])
    results = [[] for _ in engines]
    for follow_up in [None, *FOLLOW_UPS]:
        if follow_up is not None:
            ids = ids + results[0][-1].tokens + list(tokenizer(follow_up)["input_ids"][1:])
        for engine, out in zip(engines, results):
            out.append(engine.generate(ids, NEW, **generate_options))
    return results


@pytest.mark.parametrize("mode", MODES)
def test_a_conversation_with_reuse_equals_one_without(tiny_models, tiny_tokenizer, mode):
    reuse, fresh = (_engine(tiny_models, tiny_tokenizer, mode, prefix_cache=on) for on in (True, False))
    with_cache, without = _conversation([reuse, fresh], tiny_tokenizer)
    assert [r.tokens for r in with_cache] == [r.tokens for r in without]
    cached = [r.stats["cached_tokens"] for r in with_cache]
    assert cached[0] == 0 and all(0 < c < r.stats["prompt_tokens"] for c, r in zip(cached[1:], with_cache[1:]))
    # what a turn reuses is at least the whole previous prompt
    assert all(c >= r.stats["prompt_tokens"] - 1 for c, r in zip(cached[1:], with_cache))
    assert all(r.stats["cached_tokens"] == 0 for r in without)


@pytest.mark.parametrize("mode", ["llmcad", "target-only"])
def test_seeded_sampling_with_reuse_equals_one_without(tiny_models, tiny_tokenizer, mode):
    reuse, fresh = (_engine(tiny_models, tiny_tokenizer, mode, prefix_cache=on) for on in (True, False))
    with_cache, without = _conversation([reuse, fresh], tiny_tokenizer, do_sample=True, seed=11, top_k=30)
    assert [r.tokens for r in with_cache] == [r.tokens for r in without]
    assert with_cache[-1].stats["cached_tokens"] > 0


def test_the_same_prompt_again_reuses_all_but_its_last_token(tiny_models, tiny_tokenizer):
    engine = _engine(tiny_models, tiny_tokenizer, "llmcad")
    ids = list(tiny_tokenizer("The quick brown fox jumps")["input_ids"])
    first, again = engine.generate(ids, NEW), engine.generate(ids, NEW)
    assert again.tokens == first.tokens and again.stats["cached_tokens"] == len(ids) - 1


@pytest.fixture(scope="module")
def streaming_budget(tiny_pair_dirs):
    """The smallest budget: every target layer streamed, KV positions for the context and little more."""
    dirs = tiny_pair_dirs("qwen2")
    return pair_models.least_budget(dirs["shared"], dirs["target"])


@pytest.mark.parametrize("mode", MODES)
def test_streamed_reuse_equals_fresh_and_prefills_the_rest_in_the_first_pass(tiny_pair_dirs, streaming_budget,
                                                                          mode):
    dirs = tiny_pair_dirs("qwen2")
    engines = [LLMCad.from_pretrained(dirs["shared"], dirs["target"], mode=mode, memory_budget=streaming_budget,
                                      prefix_cache=on) for on in (True, False)]
    try:
        assert engines[0].placement.resident_layers == []
        tokenizer = engines[0].tokenizer
        with_cache, without = _conversation(engines, tokenizer)
        assert [r.tokens for r in with_cache] == [r.tokens for r in without]
        assert all(r.stats["cached_tokens"] > 0 for r in with_cache[1:])
        embed = engines[0].streamed.index.embedding
        row = embed.length // embed.shape[0]  # the embedding is read by rows, beside the layers
        for result in with_cache:  # every pass (the first carries the uncached prompt) reads each layer once
            rows = result.stats["bytes_read"] - result.stats["target_passes"] * engines[0].placement.bytes_per_pass
            assert rows >= 0 and rows % row == 0  # whole rows
    finally:
        for engine in engines:
            engine.close()


def test_kept_entries_and_the_running_generation_stay_within_the_budget(tiny_pair_dirs, streaming_budget,
                                                                       monkeypatch):
    dirs = tiny_pair_dirs("qwen2")
    engine = LLMCad.from_pretrained(dirs["shared"], dirs["target"], mode="chain", memory_budget=streaming_budget)
    fresh = LLMCad.from_pretrained(dirs["shared"], dirs["target"], mode="chain", memory_budget=streaming_budget,
                                   prefix_cache=False)
    pool, cache, tokenizer = engine._draft_kv_positions, engine.prefix_cache, engine.tokenizer
    # long unrelated prompts: two entries would fit in the pool, but not beside another generation
    long_a = list(tokenizer("def add(a, b):\n    return a + b\n" * 4)["input_ids"])
    long_b = list(tokenizer("The quick brown fox jumps over the lazy dog. " * 7)["input_ids"])
    both = len(long_a) + len(long_b) + 2 * NEW
    assert both < pool < both + 5 * engine.policy.max_tree_tokens
    try:
        short = list(tokenizer("def add(a, b):")["input_ids"])  # fits beside the last entry: both kept
        runs = [(prompt, max_new, fresh.generate(prompt, max_new), entries)
                for prompt, max_new, entries in ((long_a, NEW, 1), (long_b, NEW, 1), (long_a, 3 * NEW, 1),
                                                 (short, NEW, 2))]
        seen = []  # (positions in a live cache before a commit, positions the entries hold then)
        commit = kv.commit
        monkeypatch.setattr(kv, "commit", lambda c, keep, **kw: (seen.append((kv.cache_length(c),
                                                                              cache.stored_positions)),
                                                                  commit(c, keep, **kw))[1])
        for prompt, max_new, want, entries in runs:
            got = engine.generate(prompt, max_new)
            assert got.tokens == want.tokens and got.stats["stop_reason"] == want.stats["stop_reason"]
            assert cache.stored_positions <= pool and len(cache.entries) == entries  # 1: the other was evicted
            assert cache.entries[-1].tokens == prompt + got.tokens[:len(cache.entries[-1]) - len(prompt)]
        assert seen and all(live + stored <= pool for live, stored in seen)
        assert max(stored for _, stored in seen) > 0  # entries were kept during generations
    finally:
        engine.close()
        fresh.close()
    assert cache.entries == []  # close() lets go of them


# ---------------------------------------------------------------- conversations as messages
@pytest.fixture(scope="module")
def chat_tokenizer():
    return pair_models.build_tokenizer(chat_template=pair_models.CHAT_TEMPLATE)


def test_messages_keep_the_conversation_and_an_edited_history_reuses_the_common_prefix(tiny_models,
                                                                                      chat_tokenizer):
    from llmcad.models.chat import chat_prompt_ids

    engine = _engine(tiny_models, chat_tokenizer, "llmcad")
    fresh = _engine(tiny_models, chat_tokenizer, "llmcad", prefix_cache=False)
    messages = [{"role": "system", "content": "You write Python."}]
    for turn in ("def add(a, b):", "for i in range(10):", "The quick brown"):
        messages.append({"role": "user", "content": turn})
        got, want = engine.generate(messages, NEW), fresh.generate(messages, NEW)
        assert got.tokens == want.tokens
        messages.append({"role": "assistant", "content": got.text})
    assert got.stats["cached_tokens"] > len(chat_prompt_ids(chat_tokenizer, messages[:4])) - 2
    kept = engine.prefix_cache.entries[-1].tokens
    edited = [messages[0], {"role": "user", "content": "def sub(a, b):"}, *messages[2:]]
    ids = chat_prompt_ids(chat_tokenizer, edited)
    got, want = engine.generate(edited, NEW), fresh.generate(edited, NEW)
    assert got.tokens == want.tokens
    assert got.stats["cached_tokens"] == common_prefix(kept, ids) < len(chat_prompt_ids(chat_tokenizer, edited[:1]))\
        + 4


def test_prefix_cache_option_is_checked(tiny_models, tiny_tokenizer):
    with pytest.raises(ValueError, match="prefix_cache='yes': expected True or False"):
        _engine(tiny_models, tiny_tokenizer, "chain", prefix_cache="yes")
    assert _engine(tiny_models, tiny_tokenizer, "chain", prefix_cache=False).prefix_cache is None


# ---------------------------------------------------------------- the cache alone
def _kv(n: int, value: float = 0.0) -> DynamicCache:
    """A one-layer cache of ``n`` positions whose keys hold their position (+ ``value``)."""
    keys = (torch.arange(n, dtype=torch.float32) + value).view(1, 1, n, 1)
    return DynamicCache(ddp_cache_data=[(keys, keys.clone())])


def test_longest_match_lru_copy_and_handover():
    cache = PrefixCache(pool=None, max_entries=2)
    cache.put([1, 2, 3, 4], _kv(6), _kv(6))
    assert len(cache.entries[0]) == 4 and kv.cache_length(cache.entries[0].target) == 4
    cache.put([1, 2, 9], _kv(3, 100.0), None)
    assert cache.take([5, 6], need=4, with_draft=True) is None  # nothing shared
    # a partial match is copied: the entry stays
    reuse = cache.take([1, 2, 3, 7, 8], need=8, with_draft=True)
    assert reuse.tokens == 3 and kv.cache_length(reuse.target) == kv.cache_length(reuse.draft) == 3
    assert [len(e) for e in cache.entries] == [3, 4]  # the source is now the most recently used
    # the last prompt token is never reused; without a draft, entries without one count too
    reuse = cache.take([1, 2, 9], need=4, with_draft=False)
    assert reuse.tokens == 2 and reuse.target.layers[0].keys.flatten().tolist() == [100.0, 101.0]
    # an entry that is a prefix of the prompt is handed over
    reuse = cache.take([1, 2, 3, 4, 5], need=8, with_draft=True)
    assert reuse.tokens == 4 and [len(e) for e in cache.entries] == [3]
    # entries a new one extends go; more than max_entries: the least recently used goes
    cache.put([1, 2, 9, 9], _kv(4), None)
    assert [e.tokens for e in cache.entries] == [[1, 2, 9, 9]]
    cache.put([3], _kv(1), None)
    cache.put([4], _kv(1), None)
    assert [e.tokens for e in cache.entries] == [[3], [4]]


def test_a_pool_evicts_for_the_generation_and_hands_over_what_cannot_stay():
    cache = PrefixCache(pool=10)
    cache.put([1, 2, 3, 4], _kv(4), _kv(4))
    cache.put([5, 6, 7], _kv(3), _kv(3))
    assert cache.room() == 3
    reuse = cache.take([5, 6, 8, 9], need=6, with_draft=True)  # the copy's source stays: 3 + 6 <= 10
    assert reuse.tokens == 2 and [e.tokens for e in cache.entries] == [[5, 6, 7]] and cache.room() == 7
    reuse = cache.take([5, 6, 8, 9], need=8, with_draft=True)  # 3 + 8 > 10: cut and handed over
    assert reuse.tokens == 2 and cache.entries == [] and kv.cache_length(reuse.target) == 2
    cache.put(list(range(12)), _kv(12), _kv(12))  # more than the pool holds: not kept
    assert cache.entries == []
