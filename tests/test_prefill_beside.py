"""A resident target caches the prompt on a thread of its own while the draft drafts the first tree:
output stays the target's own (greedy and seeded sampling), the first pass holds the tree alone, the
prefill in passes of awkward sizes leaves the same cache as riding along, and errors on either thread
surface with no thread left behind."""
from __future__ import annotations

import math
import threading
import time

import pytest
import torch

import pair_models
from llmcad import LLMCad
from llmcad.engine import PREFILL_BESIDE_MIN_TOKENS
from llmcad.speculative.policy import make_policy
from llmcad.speculative.verify import TargetVerifier
from test_pipeline import budgets  # noqa: F401 (fixture)

# a prompt of well over PREFILL_BESIDE_MIN_TOKENS tokens
LONG = ("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number, counting from zero.\"\"\"\n"
        "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
        "def factorial(n):\n    \"\"\"Return n! for a non-negative integer n.\"\"\"\n")
NEW_TOKENS = 16


def reference(model, ids, max_new_tokens):
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(ids):].tolist()


def engine(tiny_models, tokenizer, family, mode, prefill_beside, draft_kind="shared", **options):
    eng = LLMCad(tiny_models(family, draft_kind), tiny_models(family, "target"), tokenizer,
                 make_policy(mode, **options))
    eng.prefill_beside = prefill_beside
    return eng


def prefill_threads() -> list:
    return [t for t in threading.enumerate() if t.name.startswith("llmcad-prefill")]


@pytest.mark.parametrize("family", pair_models.FAMILIES)
def test_greedy_with_the_prompt_prefilled_beside_equals_target_generate(tiny_models, tiny_tokenizer, family):
    ids = tiny_tokenizer(LONG)["input_ids"]
    assert len(ids) > PREFILL_BESIDE_MIN_TOKENS
    expected = reference(tiny_models(family, "target"), ids, NEW_TOKENS)
    for mode, options in [("llmcad", {}), ("chain", {}), ("tree", {"max_tree_tokens": 6}),
                          ("llmcad", {"alpha_rule": "paper"})]:
        for beside in (True, False):
            result = engine(tiny_models, tiny_tokenizer, family, mode, beside, **options).generate(LONG, NEW_TOKENS)
            assert result.tokens == expected, (family, mode, options, beside)
            assert result.stats["prefill_beside"] is beside
            if mode == "llmcad" and not options:
                # the prompt's pass, of its own or with the first tree riding in it, is the pass model's
                # probe of a row's compute, kept out of the fit of the tree passes
                model = result.stats["target_pass_model_s"]
                assert model["prefill_passes_left_out"] == 1 and model["probe_per_token"] > 0, beside


def test_short_prompts_and_target_only_ride_along(tiny_models, tiny_tokenizer):
    short = engine(tiny_models, tiny_tokenizer, "llama", "llmcad", True).generate("def add(a, b):", 4)
    assert short.stats["prefill_beside"] is False  # under PREFILL_BESIDE_MIN_TOKENS: one pass is cheaper
    alone = engine(tiny_models, tiny_tokenizer, "llama", "target-only", True).generate(LONG, 4)
    assert alone.stats["prefill_beside"] is False  # no draft to run beside


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_seeded_sampling_with_the_prompt_prefilled_beside_equals_target_only(tiny_models, tiny_tokenizer, family):
    sampling = {"do_sample": True, "temperature": 0.9, "top_k": 20}
    for seed in (1, 7):
        want = engine(tiny_models, tiny_tokenizer, family, "target-only", None).generate(
            LONG, NEW_TOKENS, seed=seed, **sampling).tokens
        got = engine(tiny_models, tiny_tokenizer, family, "llmcad", True).generate(LONG, NEW_TOKENS, seed=seed,
                                                                                  **sampling)
        assert got.stats["prefill_beside"] is True and got.tokens == want, (family, seed)


@pytest.mark.parametrize("chunk_rows, max_pass_rows", [(1, None), (7, None), (64, 5), (1000, None)])
def test_prefill_in_passes_of_awkward_sizes_leaves_the_cache_riding_along_would(tiny_models, tiny_tokenizer,
                                                                                chunk_rows, max_pass_rows):
    target = tiny_models("qwen2", "target")
    ids = tiny_tokenizer(LONG)["input_ids"]
    tokens, parents = [ids[-1], 11, 12, 13], [-1, 0, 0, 1]
    riding = TargetVerifier(target, ids)
    want = riding.run(tokens, parents).full()
    apart = TargetVerifier(target, ids, max_pass_rows=max_pass_rows)
    apart.prefill_pending(chunk_rows=chunk_rows)
    assert apart.pending == [] and apart.committed_length == len(ids) - 1
    got = apart.run(tokens, parents).full()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert apart.committed_length == riding.committed_length == len(ids) - 1


def test_a_stopped_prefill_starts_no_further_pass(tiny_models, tiny_tokenizer):
    verifier = TargetVerifier(tiny_models("llama", "target"), tiny_tokenizer(LONG)["input_ids"])
    stop = threading.Event()
    stop.set()
    with pytest.raises(InterruptedError, match="prefill was stopped"):
        verifier.prefill_pending(stop, chunk_rows=4)
    assert verifier.committed_length == 0


def _no_prefill_thread_left() -> bool:
    deadline = time.monotonic() + 10
    while prefill_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    return not prefill_threads()


def test_an_error_in_the_prefill_surfaces_and_the_engine_recovers(tiny_models, tiny_tokenizer, monkeypatch):
    eng = engine(tiny_models, tiny_tokenizer, "llama", "llmcad", True)
    ids = tiny_tokenizer(LONG)["input_ids"]
    expected = reference(tiny_models("llama", "target"), ids, NEW_TOKENS)

    def broken(self, stop=None, chunk_rows=256):
        raise RuntimeError("prefill failed on purpose")

    with monkeypatch.context() as patch:
        patch.setattr(TargetVerifier, "prefill_pending", broken)
        with pytest.raises(RuntimeError, match="prefill failed on purpose"):
            eng.generate(LONG, NEW_TOKENS)
    assert _no_prefill_thread_left()
    assert eng.generate(LONG, NEW_TOKENS).tokens == expected


def test_an_error_in_the_first_tree_stops_the_prefill_and_leaves_no_thread(tiny_models, tiny_tokenizer,
                                                                           monkeypatch):
    from llmcad.speculative.draft import TreeDrafter

    eng = engine(tiny_models, tiny_tokenizer, "llama", "llmcad", True)
    passes = []
    original = TargetVerifier.prefill_pending

    def counted(self, stop=None, chunk_rows=256):
        passes.append(stop)
        return original(self, stop, chunk_rows=1)  # a pass a token: the stop is checked between them

    def broken(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(TargetVerifier, "prefill_pending", counted)
    monkeypatch.setattr(TreeDrafter, "grow", broken)
    with pytest.raises(KeyboardInterrupt):
        eng.generate(LONG, NEW_TOKENS)
    assert _no_prefill_thread_left()
    assert len(passes) == 1 and passes[0].is_set()  # the draft's error told the prefill to stop


def test_the_default_prefills_beside_where_torch_and_other_processes_leave_a_core_free(tiny_models, monkeypatch):
    from llmcad import engine as engine_module

    target = tiny_models("llama", "target")
    monkeypatch.setattr(engine_module.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    for threads, busy, spare in ((1, 0, True), (3, 0, True), (4, 0, False), (8, 0, False), (2, 1, True),
                                 (3, 1, False), (1, 3, False)):  # busy: cores other processes keep busy
        monkeypatch.setattr(engine_module.torch, "get_num_threads", lambda n=threads: n)
        assert engine_module._core_to_spare(target, busy) is spare, (threads, busy)


def test_the_cli_turns_the_prefill_beside_off(tiny_pair_dirs, capsys):
    import json

    from llmcad import cli

    dirs = tiny_pair_dirs("llama")
    args = ["generate", "--draft", str(dirs["shared"]), "--target", str(dirs["target"]), "--prompt", LONG,
            "--max-new-tokens", "8", "--json"]
    assert cli.main(args + ["--no-prefill-beside"]) == 0
    off = json.loads(capsys.readouterr().out)
    assert off["stats"]["prefill_beside"] is False
    assert cli.main(args) == 0
    default = json.loads(capsys.readouterr().out)
    assert default["tokens"] == off["tokens"]


# ---- a streamed target: the prompt's pass of its own reads every streamed layer once more


@pytest.mark.parametrize("mode, pipelined", [("llmcad", True), ("chain", False), ("llmcad", False)])
def test_a_streamed_target_prefilled_beside_equals_target_generate(tiny_pair_dirs, tiny_models, tiny_tokenizer,
                                                                    budgets, mode, pipelined):  # noqa: F811
    from test_pipeline import generate, streamed_engine

    ids = tiny_tokenizer(LONG)["input_ids"]
    expected = reference(tiny_models("qwen2", "target"), ids, NEW_TOKENS)
    with streamed_engine(tiny_pair_dirs, budgets, "shared", mode=mode, pipeline=pipelined) as eng:
        for beside in (True, False):
            eng.prefill_beside = beside
            passes = eng.streamed.passes
            result = generate(eng, ids, NEW_TOKENS)
            assert result.tokens == expected, (mode, beside)
            assert result.stats["prefill_beside"] is beside and result.stats["pipeline"] is pipelined
            # the prompt's own passes (of at most the budget's pass rows) beside the tree passes
            prompt_passes = eng.streamed.passes - passes - result.stats["target_passes"]
            if beside:
                assert prompt_passes == math.ceil((len(ids) - 1) / eng.pass_rows)
            else:
                assert prompt_passes < math.ceil((len(ids) - 1) / eng.pass_rows)


def test_a_failed_read_in_a_streamed_prefill_surfaces_and_the_engine_recovers(tiny_pair_dirs, tiny_models,
                                                                               tiny_tokenizer, budgets):  # noqa: F811
    from test_pipeline import SLOW_IO, generate, streamed_engine
    from llmcad.errors import StreamerIOError

    ids = tiny_tokenizer(LONG)["input_ids"]
    expected = reference(tiny_models("qwen2", "target"), ids, NEW_TOKENS)
    with streamed_engine(tiny_pair_dirs, budgets, "shared", streamer_options=SLOW_IO) as eng:
        eng.prefill_beside = True
        before = set(threading.enumerate())
        eng.streamed.drop_prefetch()
        eng.streamed.streamer.inject_fault(2)  # a read inside the prompt's pass
        with pytest.raises(StreamerIOError):
            generate(eng, ids, NEW_TOKENS)
        deadline = time.monotonic() + 10
        while {t for t in set(threading.enumerate()) - before if t.is_alive() and not t.daemon} and \
                time.monotonic() < deadline:
            time.sleep(0.01)
        assert not prefill_threads()
        assert generate(eng, ids, NEW_TOKENS).tokens == expected


def test_the_pass_model_says_where_a_prompt_pass_of_its_own_pays():
    from llmcad.speculative.policy import LLMCadPolicy

    def policy(fixed, per_token, io_bound, draft_per_row=0.01):
        p = LLMCadPolicy()
        for rows in (4, 16, 64):
            p.observe_pass(rows, fixed + per_token * rows)
            p.observe_draft(rows, 0.05 + draft_per_row * rows)
        p.io_bound_s = io_bound
        return p

    assert LLMCadPolicy().prefill_apart_pays(200) is None  # no pass measured yet
    # resident: the draft's prefill hides under the target's, for one pass's fixed cost more
    assert policy(0.25, 0.015, None).prefill_apart_pays(200) is True
    # resident but a tiny prompt: the fixed cost is more than the prefill it hides
    assert policy(0.25, 0.015, None, draft_per_row=0.0001).prefill_apart_pays(2) is False
    # slow reads (emmc): a pass of its own reads every streamed layer once more
    assert policy(0.25, 0.015, 7.5).prefill_apart_pays(200) is False
    # fast reads and a compute-bound prompt pass: the draft's prefill hides under it
    assert policy(0.25, 0.015, 1.6).prefill_apart_pays(200) is True
