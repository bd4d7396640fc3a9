"""The draft drafts alone on more threads (``draft_threads``) than it and the target use beside each other
(``threads``): each forward runs on the count meant for it, the output stays the target's own, and the
cost rule prices forwards during a pass with their own model."""
from __future__ import annotations

import json

import pytest
import torch

from llmcad import cli
from llmcad.engine import LLMCad
from llmcad.speculative.draft import TreeDrafter
from llmcad.speculative.policy import make_policy
from llmcad.speculative.verify import TargetVerifier
from test_pipeline import SLOW_IO, budgets, expected_tokens, generate, streamed_engine  # noqa: F401 (fixture)
from test_prefill_beside import LONG, engine as resident_engine, reference


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def seen(monkeypatch):
    """Threads each kind of forward ran on: grow (the draft alone), provisional draft forwards, target passes."""
    out = {"grow": [], "provisional": [], "pass": []}
    grow, run_rows, run = TreeDrafter.grow, TreeDrafter._run_rows, TargetVerifier.run

    def spy_grow(self, *args, **kwargs):
        out["grow"].append(torch.get_num_threads())
        return grow(self, *args, **kwargs)

    def spy_rows(self, tree, nodes, policy, name="draft"):
        if name == "provisional":
            out["provisional"].append(torch.get_num_threads())
        return run_rows(self, tree, nodes, policy, name)

    def spy_run(self, *args, **kwargs):
        out["pass"].append(torch.get_num_threads())
        return run(self, *args, **kwargs)

    monkeypatch.setattr(TreeDrafter, "grow", spy_grow)
    monkeypatch.setattr(TreeDrafter, "_run_rows", spy_rows)
    monkeypatch.setattr(TargetVerifier, "run", spy_run)
    return out


@pytest.mark.parametrize("mode", ["llmcad", "chain"])
def test_the_draft_alone_runs_on_its_threads_and_the_pass_keeps_its_own(tiny_pair_dirs, tiny_models,
                                                                        tiny_tokenizer, one_thread, seen, mode,
                                                                        budgets):  # noqa: F811
    ids, want = expected_tokens(tiny_models, tiny_tokenizer)
    # lockstep: every verification's first IO wait lasts until the draft has drafted, so provisional forwards
    # run whatever the machine's load (a loaded CI host can leave a tiny pass no wait worth a step)
    with streamed_engine(tiny_pair_dirs, budgets, "shared", mode=mode, pipeline=True, threads=1, draft_threads=2,
                         streamer_options=SLOW_IO, lockstep=True) as engine:
        engine.draft_beside_compute = False  # every provisional forward during reads: all are timed
        result = generate(engine, ids, 12)
    assert result.tokens == want
    assert result.stats["cpu_threads"]["threads"] == 1 and result.stats["cpu_threads"]["draft_alone"] == 2
    assert seen["grow"] and set(seen["grow"]) == {2}
    assert seen["pass"] and set(seen["pass"]) == {1}  # on the verify worker, beside the draft
    assert seen["provisional"] and set(seen["provisional"]) == {1}
    assert torch.get_num_threads() == 1
    if mode == "llmcad":  # the forwards during passes have a model of their own
        assert result.stats["draft_during_pass_model_s"]["observations"] > 0


def test_the_first_tree_beside_the_prompt_s_pass_keeps_the_shared_threads(tiny_models, tiny_tokenizer, one_thread,
                                                                          seen):
    eng = resident_engine(tiny_models, tiny_tokenizer, "llama", "llmcad", True)
    eng.cpu_threads = {**eng.cpu_threads, "draft_alone": 2}
    result = eng.generate(LONG, 16)
    assert result.tokens == reference(tiny_models("llama", "target"), tiny_tokenizer(LONG)["input_ids"], 16)
    assert result.stats["prefill_beside"] is True
    assert seen["grow"][0] == 1 and set(seen["grow"][1:]) <= {2} and len(seen["grow"]) > 1
    assert torch.get_num_threads() == 1


def test_seeded_sampling_is_unchanged_by_the_draft_s_threads(tiny_pair_dirs, tiny_models, tiny_tokenizer,
                                                             one_thread, budgets):  # noqa: F811
    ids, _ = expected_tokens(tiny_models, tiny_tokenizer)
    sampling = {"do_sample": True, "temperature": 0.8, "top_k": 30, "seed": 5}
    out = {}
    for draft_threads in (1, 2):
        with streamed_engine(tiny_pair_dirs, budgets, "shared", threads=1, draft_threads=draft_threads,
                             streamer_options=SLOW_IO) as engine:
            out[draft_threads] = engine.generate(ids, max_new_tokens=12, **sampling).tokens
    with streamed_engine(tiny_pair_dirs, budgets, "shared", mode="target-only") as engine:
        want = engine.generate(ids, max_new_tokens=12, **sampling).tokens
    assert out[1] == out[2] == want


def test_forwards_during_a_pass_are_priced_by_their_own_model():
    policy = make_policy("llmcad")
    policy.observe_draft(1, 0.02)
    assert policy.draft_cost_during_pass(4) == pytest.approx(policy.draft_cost(4))  # none measured: alone's
    for rows in (1, 2, 4, 8, 16, 1, 2, 4, 8, 16):
        policy.observe_draft(rows, 0.01 + 0.001 * rows)  # alone: cheap rows
        policy.observe_draft(rows, 0.02 + 0.02 * rows, during_pass=True)  # during a pass: dear rows
    assert policy.draft_cost(8) == pytest.approx(0.018)
    assert policy.draft_cost_during_pass(8) == pytest.approx(0.18)
    values = [0.9 ** i for i in range(1, 17)]
    assert policy.rows(values, during_pass=True) < policy.rows(values)
    report = policy.report()
    assert report["draft_during_pass_model_s"]["observations"] == 10
    assert report["draft_model_s"]["observations"] == 11


def test_the_command_line_count(tiny_pair_dirs, capsys):
    dirs = tiny_pair_dirs("llama")
    args = ["generate", "--draft", str(dirs["shared"]), "--target", str(dirs["target"]), "--prompt",
            "def add(a, b):", "--max-new-tokens", "6", "--json"]
    before = torch.get_num_threads()
    try:
        assert cli.main(args) == 0
        want = json.loads(capsys.readouterr().out)
        assert cli.main(args + ["--threads", "1", "--draft-threads", "2"]) == 0
        got = json.loads(capsys.readouterr().out)
    finally:
        torch.set_num_threads(before)
    assert got["tokens"] == want["tokens"] and got["stats"]["cpu_threads"]["draft_alone"] == 2
    for bad in ("0", "x"):
        assert cli.main(args + ["--draft-threads", bad]) == 2
        assert f"--draft-threads={bad}: expected an int >= 1 or 'auto'" in capsys.readouterr().err


def test_a_bad_count_is_named_before_loading():
    with pytest.raises(ValueError, match="draft_threads=0: expected an int >= 1 or 'auto'"):
        LLMCad.from_pretrained("/nonexistent/draft", "/nonexistent/target", draft_threads=0)


def test_the_summary_names_the_draft_s_count_where_it_differs():
    from llmcad.stats import threads_line

    line = threads_line({"threads": 1, "usable_cores": 2, "chosen": "given", "draft_alone": 2})
    assert line == "1 of 2 cores (given), the draft alone 2"
    assert "alone" not in threads_line({"threads": 2, "usable_cores": 2, "chosen": "auto", "draft_alone": 2})
