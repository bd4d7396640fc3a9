"""Sampled generation follows the target's processed distribution exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llmcad import LLMCad
from llmcad.speculative.policy import make_policy
from llmcad.speculative.verify import TargetChooser

PROMPT = "def add(a, b):"
TOP_K = 4
RUNS = 1000
CHI2_CRITICAL_DF15_P001 = 37.70  # chi-square critical value, 15 degrees of freedom, p = 0.001


def target_joint(model, ids, chooser):
    """P(t1, t2) of the first two sampled tokens under the target's processed distribution."""
    with torch.no_grad():
        p1 = chooser.processed_probs(model(torch.tensor([ids])).logits[0, -1:])[0]
        joint = torch.zeros(p1.numel(), p1.numel(), dtype=torch.float64)
        for t1 in torch.nonzero(p1).flatten().tolist():
            p2 = chooser.processed_probs(model(torch.tensor([ids + [t1]])).logits[0, -1:])[0]
            joint[t1] = p1[t1].double() * p2.double()
    return joint


@pytest.mark.parametrize("mode,options", [("llmcad", {"branch_threshold": 0.1})])
def test_first_two_tokens_follow_target_distribution(tiny_models, tiny_tokenizer, mode, options):
    """Joint frequency of the first two tokens over many seeds vs the target's own P(t1) P(t2 | t1);
    the second token comes from a tree node (accepted draft) or from a fresh pass (rejection)."""
    target = tiny_models("llama", "target")
    eng = LLMCad(tiny_models("llama", "shared"), target, tiny_tokenizer, make_policy(mode, **options))
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    sampling = dict(temperature=0.8, top_k=TOP_K)
    expected = target_joint(target, ids, TargetChooser(do_sample=True, **sampling))
    counts = torch.zeros_like(expected)
    accepted_drafts = 0
    for seed in range(RUNS):
        result = eng.generate(ids, 2, do_sample=True, seed=seed, **sampling)
        counts[result.tokens[0], result.tokens[1]] += 1
        accepted_drafts += sum(int(k) * v for k, v in result.stats["accepted_length_hist"].items())
    assert accepted_drafts > RUNS // 10, "the draft should get some tokens accepted, or the test is trivial"
    support = expected > 0
    assert int(support.sum()) == TOP_K * TOP_K
    assert counts[~support].sum() == 0, "a token outside the target's top-k support was emitted"
    e = expected[support] * RUNS
    o = counts[support]
    chi2 = float(((o - e) ** 2 / e).sum())
    cosine = float(torch.nn.functional.cosine_similarity(o, e, dim=0))
    print(f"{mode}: chi2={chi2:.2f} cosine={cosine:.5f} accepted_drafts={accepted_drafts}")
    assert chi2 < CHI2_CRITICAL_DF15_P001, (chi2, o.tolist(), e.tolist())
    assert cosine > 0.99


def test_processing_matches_transformers_sampler(tiny_models, tiny_tokenizer):
    """Our processed distribution equals the scores transformers' generate samples from."""
    target = tiny_models("qwen2", "target")
    ids = torch.tensor([tiny_tokenizer(PROMPT)["input_ids"]])
    for params in ({"temperature": 0.7, "top_k": 10, "top_p": 0.9}, {"top_p": 0.5}, {"temperature": 1.3},
                   {"top_k": 1}):
        out = target.generate(ids, max_new_tokens=1, do_sample=True, output_scores=True,
                              return_dict_in_generate=True, **{"top_k": None, **params})
        hf_probs = torch.softmax(out.scores[0].float(), dim=-1)[0]
        with torch.no_grad():
            logits = target(ids).logits[0, -1:]
        ours = TargetChooser(do_sample=True, **params).processed_probs(logits)[0]
        torch.testing.assert_close(ours, hf_probs, rtol=1e-5, atol=1e-7)


def test_sampling_with_top_k_one_is_greedy(tiny_models, tiny_tokenizer):
    eng = LLMCad(tiny_models("mistral", "shared"), tiny_models("mistral", "target"), tiny_tokenizer,
                 make_policy("tree"))
    greedy = eng.generate(PROMPT, 12)
    assert eng.generate(PROMPT, 12, do_sample=True, top_k=1, seed=3).tokens == greedy.tokens


@pytest.mark.parametrize("bad", [{"temperature": 1e-9}, {"temperature": -1.0}, {"top_k": 0}, {"top_k": 2.5},
                                 {"top_p": 0.0}, {"top_p": 1.5}, {"seed": -1}])
def test_bad_sampling_parameters_name_the_parameter(tiny_models, tiny_tokenizer, bad):
    eng = LLMCad(tiny_models("llama", "shared"), tiny_models("llama", "target"), tiny_tokenizer,
                 make_policy("llmcad"))
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        eng.generate(PROMPT, 4, do_sample=True, **bad)


def test_choice_uses_the_seeded_generator():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    a = TargetChooser(do_sample=True, seed=11).choose(logits)
    b = TargetChooser(do_sample=True, seed=11).choose(logits)
    assert np.array_equal(a, b) and a.dtype == np.int32
    assert np.array_equal(TargetChooser().choose(logits), logits.argmax(-1).numpy())


SAMPLED_MODES = [("chain", {}), ("tree", {"branch_threshold": 0.05}), ("llmcad", {}),
                 ("llmcad", {"max_tree_tokens": 6, "branch_threshold": 0.1}), ("llmcad", {"alpha_rule": "paper"})]


@pytest.mark.parametrize("family,draft_kind", [(f, "shared") for f in ("llama", "qwen2", "mistral", "phi3", "gemma")]
                         + [("llama", "same"), ("qwen2", "unrelated")])
def test_seeded_sampling_equals_target_only_in_every_mode(tiny_models, tiny_tokenizer, family, draft_kind):
    """Each token's noise is keyed on (seed, absolute position): any mode samples what target-only
    samples, token for token, whatever the trees and however many tokens a pass accepts."""
    target = tiny_models(family, "target")
    draft = tiny_models(family, draft_kind)
    sampling = dict(do_sample=True, temperature=0.9, top_k=30)
    seed = 5
    want = LLMCad(draft, target, tiny_tokenizer, make_policy("target-only")).generate(
        PROMPT, 16, seed=seed, **sampling).tokens
    for mode, options in SAMPLED_MODES:
        got = LLMCad(draft, target, tiny_tokenizer, make_policy(mode, **options)).generate(
            PROMPT, 16, seed=seed, **sampling)
        assert got.tokens == want, (family, draft_kind, mode, options, seed)
    other = LLMCad(draft, target, tiny_tokenizer, make_policy("target-only")).generate(PROMPT, 16, seed=1, **sampling)
    assert other.tokens != want, "different seeds should give different samples here"


def test_noise_is_keyed_on_seed_and_position_only():
    from llmcad.speculative.verify import exponential_noise

    a = exponential_noise(3, 17, 50, "cpu")
    assert torch.equal(a, exponential_noise(3, 17, 50, "cpu"))
    assert not torch.equal(a, exponential_noise(3, 18, 50, "cpu"))
    assert not torch.equal(a, exponential_noise(4, 17, 50, "cpu"))
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    chooser = TargetChooser(do_sample=True, seed=3)
    rows = chooser.choose(logits, [17, 40, 17])
    alone = chooser.choose(logits[2:3], [17])
    assert rows[2] == alone[0]  # a row's pick depends on its logits and position, not on its neighbours


def test_temperature_zero_is_greedy(tiny_models, tiny_tokenizer):
    """As in OpenAI's API and llama.cpp: temperature 0 means greedy, with or without do_sample."""
    eng = LLMCad(tiny_models("mistral", "shared"), tiny_models("mistral", "target"), tiny_tokenizer,
                 make_policy("tree"))
    greedy = eng.generate(PROMPT, 12).tokens
    assert eng.generate(PROMPT, 12, temperature=0).tokens == greedy
    for seed in (3, 4):
        assert eng.generate(PROMPT, 12, do_sample=True, temperature=0, top_k=8, top_p=0.9, seed=seed).tokens == greedy


def test_seeded_sampling_with_lookup_branches_equals_target_only(tiny_models, tiny_tokenizer):
    """Lookup nodes carry no draft probability, and need none: the target's sample at a node depends on
    the seed and the position only, so sampled output is target-only's with them in the trees too."""
    target, draft = tiny_models("llama", "target"), tiny_models("llama", "unrelated")
    prompt = "for i in range(10):\n    print(i * i)\n" * 4 + "for i in range(10):\n"
    sampling = {"do_sample": True, "temperature": 0.3, "top_k": 5, "seed": 2}
    want = LLMCad(draft, target, tiny_tokenizer, make_policy("target-only")).generate(prompt, 32, **sampling).tokens
    got = LLMCad(draft, target, tiny_tokenizer, make_policy("llmcad")).generate(prompt, 32, **sampling)
    assert got.tokens == want
    assert got.stats["lookup_nodes_accepted"] > 0
