"""End-to-end greedy losslessness of every mode against transformers' generate, plus the pieces the
engine is built from (masked forwards, KV commit, drafting, fallback) on tiny random fp32 models."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import DynamicCache

import pair_models
from llmcad import LLMCad
from llmcad.speculative import tree
from llmcad.speculative.draft import DraftTree, TreeDrafter
from llmcad.engine import GenerationResult
from llmcad.speculative.policy import LLMCadPolicy, TreePolicy, make_policy
from llmcad.speculative.forward import cache_kwargs, forward_with_mask, pending_tree_inputs
from llmcad.speculative import kv

PROMPTS = ["def add(a, b):", "The quick brown"]
NEW_TOKENS = 16
# every mode, plus option settings that stress branching, tiny trees and one-token chains
MODE_OPTIONS = [
    ("target-only", {}),
    ("chain", {}),
    ("chain", {"chain_length": 1}),
    ("tree", {}),
    ("tree", {"max_tree_tokens": 3, "max_depth": 2}),
    ("llmcad", {}),
    ("llmcad", {"max_tree_tokens": 5, "max_depth": 3}),
    ("llmcad", {"branch_threshold": 0.05, "max_tree_tokens": 12}),
    ("llmcad", {"alpha_rule": "paper"}),
    ("llmcad", {"alpha_rule": "paper", "branch_threshold": 0.05, "max_tree_tokens": 12, "alpha": 0.2}),
]


def reference(model, ids, max_new_tokens, **kwargs):
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return out[0, len(ids):].tolist()


def engine(tiny_models, tokenizer, family, draft_kind, mode, **options):
    return LLMCad(tiny_models(family, draft_kind), tiny_models(family, "target"), tokenizer,
                  make_policy(mode, **options))


@pytest.mark.parametrize("draft_kind", ["same", "unrelated", "shared"])
@pytest.mark.parametrize("family", pair_models.FAMILIES)
def test_greedy_equals_target_generate(tiny_models, tiny_tokenizer, family, draft_kind):
    target = tiny_models(family, "target")
    for prompt in PROMPTS:
        ids = tiny_tokenizer(prompt)["input_ids"]
        expected = reference(target, ids, NEW_TOKENS)
        for mode, options in MODE_OPTIONS:
            result = engine(tiny_models, tiny_tokenizer, family, draft_kind, mode, **options).generate(
                prompt, NEW_TOKENS)
            assert result.tokens == expected, (family, draft_kind, mode, options, prompt)
            assert result.text == tiny_tokenizer.decode(expected, skip_special_tokens=True)


def test_acceptance_matches_the_draft_kind(tiny_models, tiny_tokenizer):
    """draft == target accepts everything; an unrelated draft almost nothing; a shared one some."""
    per_pass = {}
    for kind in ("same", "unrelated", "shared"):
        result = engine(tiny_models, tiny_tokenizer, "phi3", kind, "chain", chain_length=4).generate(
            PROMPTS[0], NEW_TOKENS)
        per_pass[kind] = result.stats["tokens_per_pass"]
        if kind == "same":
            assert set(result.stats["accepted_length_hist"]) <= {"4", str(NEW_TOKENS % 5 - 1)}
    assert per_pass["same"] > per_pass["shared"] > per_pass["unrelated"] >= 1.0
    assert per_pass["unrelated"] < 1.5


@pytest.fixture(scope="module")
def early_eos_target(tiny_pair_dirs, tiny_models, tiny_tokenizer, tmp_path_factory):
    """A copy of the llama target whose EOS is a token its greedy output reaches at step 5."""
    ids = tiny_tokenizer(PROMPTS[0])["input_ids"]
    greedy = reference(tiny_models("llama", "target"), ids, 12)
    eos = greedy[4]
    path = tmp_path_factory.mktemp("eos") / "llama-eos"
    shutil.copytree(tiny_pair_dirs("llama")["target"], path)
    config = json.loads((path / "generation_config.json").read_text())
    config["eos_token_id"] = [eos, pair_models.EOS_ID]
    (path / "generation_config.json").write_text(json.dumps(config))
    return path, eos


@pytest.mark.parametrize("mode", ["target-only", "chain", "tree", "llmcad"])
def test_stops_at_eos_like_generate(early_eos_target, tiny_pair_dirs, tiny_tokenizer, mode):
    path, eos = early_eos_target
    eng = LLMCad.from_pretrained(tiny_pair_dirs("llama")["shared"], path, mode=mode)
    ids = tiny_tokenizer(PROMPTS[0])["input_ids"]
    expected = reference(eng.target, ids, NEW_TOKENS)
    result = eng.generate(PROMPTS[0], NEW_TOKENS)
    assert result.tokens == expected
    assert result.tokens[-1] == eos and eos not in result.tokens[:-1] and len(result.tokens) <= 5
    assert result.stats["stop_reason"] == "eos"


def test_max_new_tokens_truncates_accepted_tokens(tiny_models, tiny_tokenizer):
    eng = engine(tiny_models, tiny_tokenizer, "qwen2", "same", "tree")
    ids = tiny_tokenizer(PROMPTS[1])["input_ids"]
    for n in (1, 2, 7):
        result = eng.generate(ids, n)
        assert result.tokens == reference(eng.target, ids, n)
        assert result.stats["stop_reason"] == "max_new_tokens"


def test_stop_string_and_streamers(tiny_models, tiny_tokenizer, capsys):
    eng = engine(tiny_models, tiny_tokenizer, "gemma", "shared", "llmcad")
    full = eng.generate(PROMPTS[0], NEW_TOKENS)
    deltas = []
    streamed = eng.generate(PROMPTS[0], NEW_TOKENS, streamer=deltas.append)
    assert "".join(deltas) == streamed.text == full.text

    class PutEnd:
        def __init__(self):
            self.puts, self.ended = [], 0

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended += 1

    sink = PutEnd()
    eng.generate(PROMPTS[0], NEW_TOKENS, streamer=sink)
    assert sink.puts[0] == tiny_tokenizer(PROMPTS[0])["input_ids"]  # the prompt first, as generate does
    assert sum(sink.puts[1:], []) == full.tokens and sink.ended == 1

    from transformers import TextStreamer

    eng.generate(PROMPTS[0], NEW_TOKENS, streamer=TextStreamer(tiny_tokenizer, skip_prompt=True,
                                                               skip_special_tokens=True))
    assert capsys.readouterr().out == full.text + "\n"

    # stop right after the token that completes a piece of the text
    k = next(i for i in range(3, len(full.tokens)) if tiny_tokenizer.decode(full.tokens[i:i + 1]).strip())
    stop = tiny_tokenizer.decode(full.tokens[k:k + 1]).strip()
    stopped = eng.generate(PROMPTS[0], NEW_TOKENS, stop=[stop])
    first = next(i for i in range(1, len(full.tokens) + 1)
                 if stop in tiny_tokenizer.decode(full.tokens[:i], skip_special_tokens=True))
    assert stopped.tokens == full.tokens[:first] and stopped.stats["stop_reason"] == "stop"


def test_stats_fields(tiny_models, tiny_tokenizer):
    result = engine(tiny_models, tiny_tokenizer, "llama", "shared", "llmcad").generate(PROMPTS[0], 16)
    assert isinstance(result, GenerationResult)
    s = result.stats
    for key in ("target_passes", "tokens_per_pass", "accepted_length_hist", "draft_steps", "tokens_per_s",
                "bytes_read", "peak_rss_bytes", "time_s"):
        assert key in s
    assert s["target_passes"] == len(result.trace) == sum(s["accepted_length_hist"].values())
    assert s["tokens_per_pass"] == pytest.approx(16 / s["target_passes"])
    assert s["bytes_read"] == 0 and s["peak_rss_bytes"] > 10**7 and s["draft_steps"] > 0
    assert set(s["time_s"]) == {"draft", "target", "other", "total"}
    json.dumps(s)


def test_sampled_generation_is_reproducible_with_a_seed(tiny_models, tiny_tokenizer):
    eng = engine(tiny_models, tiny_tokenizer, "phi3", "shared", "llmcad")
    a = eng.generate(PROMPTS[0], 16, do_sample=True, seed=7, top_k=20)
    b = eng.generate(PROMPTS[0], 16, do_sample=True, seed=7, top_k=20)
    assert a.tokens == b.tokens


# ---------------------------------------------------------------- pieces


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_custom_4d_mask_and_positions_match_a_normal_forward(tiny_models, tiny_tokenizer, family):
    """Prompt pass with our float mask == HF's own causal forward; a tree pass over a cache gives each
    node the logits of a plain forward of its root-to-node path."""
    model = tiny_models(family, "target")
    ids = tiny_tokenizer(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        plain = model(torch.tensor([ids])).logits[0]
    mask, pos = pending_tree_inputs(0, len(ids) - 1, [-1], torch.float32, "cpu")
    ours = forward_with_mask(model, DynamicCache(), ids, pos, mask).full()
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)

    parents, tokens = [-1, 0, 0, 1, 1, 3, 2], [ids[-1], 50, 60, 70, 80, 90, 100]
    cache = DynamicCache()
    mask, pos = pending_tree_inputs(0, len(ids) - 1, [-1], torch.float32, "cpu")
    forward_with_mask(model, cache, ids[:-1], pos[:-1], mask[:, :, :-1, :-1])
    mask, pos = pending_tree_inputs(len(ids) - 1, 0, parents, torch.float32, "cpu")
    assert mask.dtype == torch.float32 and mask.shape == (1, 1, 7, len(ids) - 1 + 7)
    tree_logits = forward_with_mask(model, cache, tokens, pos, mask, chunk_rows=3).full()
    for node in range(len(parents)):
        path, u = [], node
        while u >= 0:
            path.append(tokens[u])
            u = parents[u]
        with torch.no_grad():
            direct = model(torch.tensor([ids[:-1] + path[::-1]])).logits[0, -1]
        torch.testing.assert_close(tree_logits[node], direct, rtol=1e-4, atol=1e-4)


def test_kv_commit_keeps_prefix_and_path(tiny_models, tiny_tokenizer):
    model = tiny_models("llama", "target")
    ids = tiny_tokenizer(PROMPTS[1])["input_ids"]
    parents, tokens = [-1, 0, 0, 2, 3, 2], [ids[-1], 11, 12, 13, 14, 15]
    cache = DynamicCache()
    prefix = len(ids) - 1
    mask, pos = pending_tree_inputs(0, prefix, parents, torch.float32, "cpu")
    forward_with_mask(model, cache, ids[:-1] + tokens, pos, mask)
    accepted = [0, 2, 3]
    kv.commit(cache, tree.commit_indices(accepted, prefix))
    fresh = DynamicCache()
    with torch.no_grad():
        model(torch.tensor([ids[:-1] + [tokens[a] for a in accepted]]), **cache_kwargs(model, fresh), use_cache=True)
    assert kv.cache_length(cache) == prefix + 3
    for mine, ref in zip(cache.layers, fresh.layers):
        torch.testing.assert_close(mine.keys, ref.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine.values, ref.values, rtol=1e-5, atol=1e-5)
    kv.commit(cache, list(range(prefix)))  # a prefix is a crop
    assert kv.cache_length(cache) == prefix
    with pytest.raises(ValueError, match="commit slots"):
        kv.commit(cache, [0, prefix + 5])


def test_drafter_branches_paces_and_commits(tiny_models, tiny_tokenizer):
    draft = tiny_models("qwen2", "shared")
    ids = tiny_tokenizer(PROMPTS[0])["input_ids"]
    policy = TreePolicy(max_tree_tokens=16, max_depth=5, branch_threshold=0.1)
    drafter = TreeDrafter(draft, ids)
    t = drafter.grow(ids[-1], policy, depth_cap=10)
    assert len(t) == 16 and max(t.depth) <= 5
    assert any(len(kids) > 1 for kids in t.children), "threshold 0.1 should open branches"
    for node, kids in enumerate(t.children):
        probs = [t.probs[k] for k in kids]
        assert all(p > 0.1 for p in probs[1:]) and (not probs or probs[0] == max(probs))
    ran = [i for i in range(len(t)) if t.slot[i] >= 0]
    assert kv.cache_length(drafter.cache) == len(ids) - 1 + len(ran) == len(ids) - 1 + drafter.steps
    tree.validate_parents(t.parents)
    # the draft's cache after a commit equals a fresh forward of the committed tokens
    path = [0] + [t.children[0][0]] + [t.children[t.children[0][0]][0]]
    drafter.commit(t, path)
    committed = ids[:-1] + [t.tokens[a] for a in path]
    fresh = DynamicCache()
    with torch.no_grad():
        draft(torch.tensor([committed[:kv.cache_length(drafter.cache)]]), **cache_kwargs(draft, fresh), use_cache=True)
    assert kv.cache_length(drafter.cache) + len(drafter.pending) == len(committed)
    for mine, ref in zip(drafter.cache.layers, fresh.layers):
        torch.testing.assert_close(mine.keys, ref.keys, rtol=1e-5, atol=1e-5)


def test_pacer_extends_largest_deficit():
    t = DraftTree.rooted(5)
    t.slot[0] = 0
    a = t.add(0, 1, 0.6)  # C=0.6, T=1
    b = t.add(0, 2, 0.35)  # C=0.35, T=1
    t.slot[a] = 1
    c = t.add(a, 3, 0.9)  # C=0.54, T=2
    # M=4: deficits b: 0.35*4-1=0.4, c: 0.54*4-2=0.16
    assert TreeDrafter._pick_leaf(None, t, max_depth=5) == b
    assert TreeDrafter._pick_leaf(None, t, max_depth=1) is None  # b and c are at the depth limit
    assert t.confidence() == pytest.approx(0.54)
    assert c in t.leaves()


def test_llmcad_fallback_rule():
    policy = LLMCadPolicy(alpha=0.01, alpha_rule="paper")
    t = DraftTree.rooted(0)
    a = t.add(0, 1, 0.9)
    b = t.add(a, 2, 0.9)
    t.add(b, 3, 0.9)  # main branch: 3 draft tokens
    t.add(0, 4, 0.4)
    assert not policy.should_verify(t)
    policy.observe(t, [0, a, b, 3])  # the whole main branch accepted
    assert policy.alpha == pytest.approx(0.005)
    policy.observe(t, [0, a])  # 1 of 3 correct on the best branch
    assert policy.alpha == pytest.approx(2 / 3)
    assert not policy.should_verify(t)  # T_c = 0.9**3 = 0.729 >= 2/3
    policy.observe(t, [0])  # nothing correct -> alpha = 1
    assert policy.alpha == 1.0 and policy.should_verify(t)
    policy.reset()
    assert policy.alpha == 0.01


def test_make_policy_errors():
    with pytest.raises(ValueError, match="llmcad, tree, chain, target-only"):
        make_policy("beam")
    with pytest.raises(ValueError, match="chain_length"):
        make_policy("chain", branch_threshold=0.3)
    with pytest.raises(ValueError, match="branch_threshold"):
        make_policy("tree", branch_threshold=1.5)
    with pytest.raises(ValueError, match="max_tree_tokens"):
        make_policy("llmcad", max_tree_tokens=0)
    with pytest.raises(ValueError, match="alpha"):
        make_policy("llmcad", alpha=0, alpha_rule="paper")
    with pytest.raises(ValueError, match="alpha_rule='paper'"):
        make_policy("llmcad", alpha=0.1)
    with pytest.raises(ValueError, match="alpha_rule"):
        make_policy("llmcad", alpha_rule="fast")


def test_loading_shows_no_foreign_progress_bar_and_restores_the_setting(tiny_pair_dirs, capfd):
    """from_pretrained prints no transformers "Loading weights" bar, and leaves the caller's
    progress-bar setting as it found it."""
    from transformers.utils import logging

    dirs = tiny_pair_dirs("llama")
    logging.enable_progress_bar()
    capfd.readouterr()
    LLMCad.from_pretrained(dirs["same"], dirs["target"]).close()
    assert "Loading" not in capfd.readouterr().err
    assert logging.is_progress_bar_enabled()


REPEATS = "for i in range(10):\n    print(i * i)\n" * 4 + "for i in range(10):\n"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_prompt_lookup_branches_are_accepted_and_exact(tiny_models, tiny_tokenizer, family):
    """A prompt of repeats and a draft that agrees with the target on almost nothing: the lookup's
    copies of the text so far are what the target accepts, and greedy output is still the target's."""
    target = tiny_models(family, "target")
    ids = tiny_tokenizer(REPEATS)["input_ids"]
    expected = reference(target, ids, 32)
    on = engine(tiny_models, tiny_tokenizer, family, "unrelated", "llmcad").generate(REPEATS, 32)
    assert on.tokens == expected
    assert on.stats["prompt_lookup"] is True
    assert on.stats["lookup_nodes_accepted_lookup_only"] > 0
    assert on.stats["lookup_nodes_proposed"] >= on.stats["lookup_nodes_accepted"] > 0
    off = engine(tiny_models, tiny_tokenizer, family, "unrelated", "llmcad", prompt_lookup=False).generate(REPEATS, 32)
    assert off.tokens == expected and off.stats["lookup_nodes_proposed"] == 0
    assert on.stats["target_passes"] < off.stats["target_passes"]
    with pytest.raises(ValueError, match="prompt_lookup"):
        make_policy("llmcad", alpha_rule="paper", prompt_lookup=True)
    with pytest.raises(ValueError, match="prompt_lookup"):
        make_policy("chain", prompt_lookup=True)
