"""llmcad.speculative.pipeline: provisional drafting during streamed verifications, the compute gate, reconciliation.

Every engine here streams every target layer (memory_budget below draft + target). ``lockstep`` engines
make provisional counts deterministic: each verification's first IO wait lasts until the draft has
drafted its provisional tokens (see ComputeGate).
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

from llmcad.speculative.draft import DraftTree
from llmcad.engine import LLMCad
from llmcad.errors import BudgetError, StreamerIOError
from llmcad.speculative.pipeline import ComputeGate, VerifyWorker, main_path, reconcile
from llmcad.streaming.streamed import load_budgeted_target

PROMPT = "def add(a, b):"
NEW_TOKENS = 12
SLOW_IO = {"bandwidth_cap": 2e6}  # bytes/s: a tiny layer (~50 KB) takes ~25 ms, far longer than a draft step


def smallest_streaming_budget(draft_dir, target_dir):
    """The smallest budget load_budgeted_target accepts: every target layer streamed."""
    from llmcad.models.loading import load_causal_lm

    draft = load_causal_lm(draft_dir)
    with pytest.raises(BudgetError) as err:
        load_budgeted_target(target_dir, memory_budget=1, draft_model=draft)
    return int(err.value.args[0].split("(")[2].split(" bytes")[0])


@pytest.fixture(scope="module")
def budgets(tiny_pair_dirs):
    cache = {}

    def get(family, draft_kind):
        dirs = tiny_pair_dirs(family)
        if (family, draft_kind) not in cache:
            cache[family, draft_kind] = smallest_streaming_budget(dirs[draft_kind], dirs["target"])
        return cache[family, draft_kind]

    return get


def streamed_engine(tiny_pair_dirs, budgets, draft_kind, *, family="qwen2", lockstep=False, draft_dir=None,
                    **options) -> LLMCad:
    dirs = tiny_pair_dirs(family)
    engine = LLMCad.from_pretrained(draft_dir or dirs[draft_kind], dirs["target"],
                                    memory_budget=budgets(family, draft_kind), **options)
    assert engine.placement.resident_layers == [] and engine.placement.streamed_layers
    engine.pipeline_lockstep = lockstep
    return engine


def generate(engine, ids, max_new_tokens, timeout=120):
    """engine.generate on a thread: a deadlock in the pipeline fails the test instead of hanging the suite."""
    out = {}

    def run():
        try:
            out["result"] = engine.generate(ids, max_new_tokens=max_new_tokens)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            out["error"] = exc

    caller = threading.Thread(target=run, daemon=True)
    caller.start()
    caller.join(timeout)
    assert not caller.is_alive(), f"generate() did not finish in {timeout} s"
    if "error" in out:
        raise out["error"]
    return out["result"]


def expected_tokens(tiny_models, tokenizer, family="qwen2", n=NEW_TOKENS):
    ids = tokenizer(PROMPT)["input_ids"]
    out = tiny_models(family, "target").generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                                 dtype=torch.long), max_new_tokens=n, do_sample=False)
    return ids, out[0, len(ids):].tolist()


def _check_lossless(engine, tiny_models, tiny_tokenizer, family="qwen2"):
    ids, want = expected_tokens(tiny_models, tiny_tokenizer, family)
    result = generate(engine, ids, NEW_TOKENS)
    assert result.tokens == want
    s = result.stats
    assert s["pipeline"] is True
    assert s["provisional_reused"] + s["provisional_dropped"] <= s["provisional_drafted"]
    return s


@pytest.mark.parametrize("alpha_rule", ["cost", "paper"])
@pytest.mark.parametrize("lockstep", [True, False])
@pytest.mark.parametrize("draft_kind", ["same", "unrelated", "shared"])
def test_llmcad_mode_is_lossless_while_drafting_provisionally(tiny_pair_dirs, tiny_models, tiny_tokenizer, budgets,
                                                            draft_kind, lockstep, alpha_rule):
    options = {} if lockstep else {"streamer_options": SLOW_IO}
    with streamed_engine(tiny_pair_dirs, budgets, draft_kind, lockstep=lockstep, alpha_rule=alpha_rule,
                         **options) as engine:
        s = _check_lossless(engine, tiny_models, tiny_tokenizer)
    assert s["mode"] == "llmcad" and s["prefetch"] is True and s["alpha_rule"] == alpha_rule
    if lockstep:  # every verification that could draft did, none stopped early for the pass's end
        assert s["provisional_drafted"] > 0 and s["provisional_steps_cut"] == 0
    assert s["provisional_step_stretch"] > 0
    if draft_kind == "same" and alpha_rule == "paper":  # the draft's greedy path is the target's: provisional
        assert s["provisional_dropped"] == 0  # tokens on the main path are always reused
        assert s["provisional_drafted"] == 0 or s["provisional_reused"] > 0
    if draft_kind == "same" and alpha_rule == "cost" and lockstep:  # the next tree grows under the bonus
        assert s["provisional_reused"] > 0


def test_draft_equal_to_target_reuses_every_provisional_token_hand_worked(tiny_pair_dirs, tiny_models,
                                                                          tiny_tokenizer, budgets):
    """chain_length 3, 2 provisional tokens, 12 tokens: each pass accepts 3 + bonus = 4 tokens, so 3 passes.
    Pass 1: 3 draft steps (root, d1, d2), then 2 provisional (run d3 -> d4, run d4 -> d5); d4 is the bonus,
    so d4 (its KV) and d5 seed pass 2, which needs 2 steps (d5, d6) and drafts 2 provisional again.
    Pass 3 has 4 tokens left: depth cap 3 = its chain, so no provisional token. Drafted 4, reused 4;
    draft steps 5 + 4 + 2 = 11."""
    ids, want = expected_tokens(tiny_models, tiny_tokenizer)
    assert len(want) == NEW_TOKENS and 1 not in want  # no EOS: the hand count needs all 12 tokens
    with streamed_engine(tiny_pair_dirs, budgets, "same", lockstep=True, mode="chain", chain_length=3,
                         pipeline=True, max_provisional_tokens=2) as engine:
        result = generate(engine, ids, NEW_TOKENS)
    s = result.stats
    assert result.tokens == want
    assert s["target_passes"] == 3 and s["tokens_per_pass"] == 4
    assert (s["provisional_drafted"], s["provisional_reused"], s["provisional_dropped"]) == (4, 4, 0)
    assert s["draft_steps"] == 11
    assert [p["provisional"] for p in result.trace] == [2, 2, 0]


@pytest.fixture(scope="module")
def flat_draft(tiny_pair_dirs, tmp_path_factory):
    """The shared draft with a zero lm_head: every next-token distribution is uniform, so it always
    proposes the same token (topk's pick among ties), one the target never chooses here."""
    from llmcad.models.loading import load_causal_lm

    dirs = tiny_pair_dirs("qwen2")
    model = load_causal_lm(dirs["shared"])
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    out = tmp_path_factory.mktemp("flat") / "flat-draft"
    model.save_pretrained(out)
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (dirs["shared"] / name).exists():
            shutil.copy(dirs["shared"] / name, out / name)
    token = int(torch.topk(torch.full((model.config.vocab_size,), 1.0 / model.config.vocab_size), 1).indices[0])
    return out, token


def test_unrelated_draft_drops_every_provisional_token_hand_worked(tiny_pair_dirs, tiny_models, tiny_tokenizer,
                                                                   budgets, flat_draft):
    """chain_length 2, 2 provisional tokens, 6 tokens, nothing accepted: one token a pass, 6 passes.
    Provisional limit = min(2, depth cap - main depth): passes 1-2: min(2, 5-2), min(2, 4-2) = 2;
    pass 3: 3-2 = 1; passes 4-6: 0 (their chains are cut to depth 2, 1, 0). Drafted 5, all dropped
    (passes 1-3 are not the last). Draft steps: 4 + 4 + 3 + 2 + 1 + 0 = 14."""
    path, token = flat_draft
    ids, want = expected_tokens(tiny_models, tiny_tokenizer, n=6)
    assert token not in want and len(want) == 6
    budget = smallest_streaming_budget(path, tiny_pair_dirs("qwen2")["target"])
    with LLMCad.from_pretrained(path, tiny_pair_dirs("qwen2")["target"], memory_budget=budget, mode="chain",
                                chain_length=2, pipeline=True, max_provisional_tokens=2) as engine:
        engine.pipeline_lockstep = True
        result = generate(engine, ids, 6)
    s = result.stats
    assert result.tokens == want and s["target_passes"] == 6
    assert (s["provisional_drafted"], s["provisional_reused"], s["provisional_dropped"]) == (5, 0, 5)
    assert [p["provisional"] for p in result.trace] == [2, 2, 1, 0, 0, 0]
    assert s["draft_steps"] == 14


def test_partly_agreeing_draft_counts_add_up(tiny_pair_dirs, tiny_models, tiny_tokenizer, budgets):
    # llama: its half-depth draft agrees with the target on some passes and not on others; the paper's
    # rule drafts main-path provisional tokens, so whole runs of them are kept or dropped
    with streamed_engine(tiny_pair_dirs, budgets, "shared", family="llama", lockstep=True, alpha_rule="paper",
                         max_provisional_tokens=3) as engine:
        ids, want = expected_tokens(tiny_models, tiny_tokenizer, "llama")
        result = generate(engine, ids, NEW_TOKENS)
    assert result.tokens == want
    per_pass = result.trace
    s = result.stats
    assert s["provisional_drafted"] > 0 and s["provisional_reused"] > 0 and s["provisional_dropped"] > 0
    assert s["provisional_drafted"] == sum(p["provisional"] for p in per_pass)
    assert s["provisional_reused"] == sum(p.get("provisional_reused", 0) for p in per_pass)
    last = per_pass[-1]["provisional"]
    assert s["provisional_reused"] + s["provisional_dropped"] == s["provisional_drafted"] - last
    assert s["provisional_followed"] == s["provisional_drafted"] - last
    assert s["provisional_reuse"] == pytest.approx(s["provisional_reused"] / s["provisional_followed"])
    for p in per_pass[:-1]:  # a pass keeps all its provisional tokens or none (no cut at these limits)
        assert p.get("provisional_reused", 0) in (0, p["provisional"])


def test_pipeline_off_prefetch_off_and_option_errors(tiny_pair_dirs, tiny_models, tiny_tokenizer, budgets):
    ids, want = expected_tokens(tiny_models, tiny_tokenizer)
    with streamed_engine(tiny_pair_dirs, budgets, "shared", pipeline=False, prefetch=False) as engine:
        result = generate(engine, ids, NEW_TOKENS)
        assert engine.streamed.prefetch_between_passes is False
    s = result.stats
    assert result.tokens == want and s["pipeline"] is False and s["prefetch"] is False
    assert s["provisional_drafted"] == 0
    dirs = tiny_pair_dirs("qwen2")
    for bad, needle in [({"mode": "target-only", "pipeline": True}, "needs a drafting mode"),
                        ({"max_provisional_tokens": -1}, "max_provisional_tokens"),
                        ({"pipeline": "yes"}, "pipeline="), ({"prefetch": 1}, "prefetch=")]:
        with pytest.raises(ValueError, match=needle):
            LLMCad.from_pretrained(dirs["shared"], dirs["target"], **bad)


def test_verification_error_surfaces_without_hang_or_leaked_threads(tiny_pair_dirs, tiny_models, tiny_tokenizer,
                                                                    budgets):
    ids, want = expected_tokens(tiny_models, tiny_tokenizer)
    with streamed_engine(tiny_pair_dirs, budgets, "shared", streamer_options=SLOW_IO) as engine:
        ctl = engine.streamed
        before = set(threading.enumerate())
        outcome = {}

        def run():
            ctl.drop_prefetch()
            ctl.streamer.inject_fault(3)  # a read inside the first verification, after a few layers
            try:
                outcome["result"] = engine.generate(ids, max_new_tokens=NEW_TOKENS)
            except BaseException as exc:  # noqa: BLE001 - the test inspects it
                outcome["error"] = exc

        caller = threading.Thread(target=run)
        caller.start()
        caller.join(timeout=120)
        assert not caller.is_alive(), "generate() hung after a failed read in the verification thread"
        assert isinstance(outcome.get("error"), StreamerIOError), outcome
        deadline = time.monotonic() + 10
        while set(threading.enumerate()) - before - {caller} and time.monotonic() < deadline:
            time.sleep(0.01)
        assert set(threading.enumerate()) - before - {caller} == set()
        # the engine recovers: the next generation is complete and lossless
        assert generate(engine, ids, NEW_TOKENS).tokens == want


def test_gate_gives_the_target_priority():
    gate = ComputeGate()
    gate.begin_verification()
    turns = []
    drafter = threading.Thread(target=lambda: turns.append(gate.draft_turn()))
    drafter.start()
    assert gate.target_waits_for_io(ready=True) is False  # layer ready: the target keeps compute
    drafter.join(timeout=0.2)
    assert drafter.is_alive() and turns == []
    assert gate.target_waits_for_io(ready=False) is True  # blocked on IO: the draft may step
    drafter.join(timeout=10)
    assert turns == [True]
    resumed = threading.Event()
    target = threading.Thread(target=lambda: (gate.target_resumes(), resumed.set()))
    target.start()
    assert not resumed.wait(0.2)  # a layer never computes while a draft step runs
    gate.draft_step_done()
    assert resumed.wait(10)
    target.join()
    second = []
    late = threading.Thread(target=lambda: second.append(gate.draft_turn()))
    late.start()
    late.join(timeout=0.2)
    assert late.is_alive()  # the target computes: no draft step
    gate.end_verification()
    late.join(timeout=10)
    assert second == [False]


def test_reconcile_keeps_the_provisional_tail_only_on_a_matching_prefix():
    tree = DraftTree.rooted(10)
    a = tree.add(0, 11, 0.9)
    tree.add(0, 12, 0.5)  # a branch
    b = tree.add(a, 13, 0.8)
    c = tree.add(b, 14, 0.7)  # provisional from here on
    d = tree.add(c, 15, 0.6)
    assert main_path(tree) == [0, a, b, c, d]
    assert reconcile(tree, [0, a, b], 14, [c, d], max_seed_depth=5) == [c, d]
    assert reconcile(tree, [0, a, b], 14, [c, d], max_seed_depth=0) == [c]
    assert reconcile(tree, [0, a, b], 99, [c, d], max_seed_depth=5) == []  # bonus differs
    assert reconcile(tree, [0, a], 99, [c, d], max_seed_depth=5) == []  # accepted path stops early
    assert reconcile(tree, [0, a], 13, [c, d], max_seed_depth=5) == [b, c, d]  # still a prefix: kept
    assert reconcile(tree, [0, 2], 14, [c, d], max_seed_depth=5) == []  # the branch was accepted
    assert reconcile(tree, [0, a, b], 14, [], max_seed_depth=5) == []


@pytest.mark.parametrize("family", ["llama"])
def test_every_ablation_row_is_lossless(tiny_pair_dirs, tiny_models, tiny_tokenizer, budgets, family):
    """The rows of `llmcad bench e2e --ablation`, as engine options."""
    rows = [{"mode": "target-only"}, {"mode": "chain"}, {"mode": "tree"}, {"mode": "llmcad", "alpha_rule": "paper"},
            {"mode": "llmcad", "pipeline": False}, {"mode": "llmcad"}]
    ids, want = expected_tokens(tiny_models, tiny_tokenizer, family)
    for options in rows:
        with streamed_engine(tiny_pair_dirs, budgets, "shared", family=family, **options) as engine:
            s = generate(engine, ids, NEW_TOKENS).stats
            assert generate(engine, ids, NEW_TOKENS).tokens == want, options
        assert s["pipeline"] is (options.get("mode") == "llmcad" and options.get("pipeline", True))


def test_gate_refuses_a_step_that_would_outlast_the_pass():
    """The streamed layers not yet acquired, at the period measured between acquires, bound the next
    draft step: one in flight when the pass ends would hold up the acceptance."""
    gate = ComputeGate(layers=4)
    gate.begin_verification()
    assert gate.pass_fits(10.0)  # no period measured yet
    gate.target_waits_for_io(ready=True)
    time.sleep(0.02)
    gate.target_waits_for_io(ready=True)  # two layers acquired, two to come, >= 20 ms apart
    assert gate.pass_fits(0.01) and not gate.pass_fits(60.0)
    gate.target_waits_for_io(ready=True)
    gate.target_waits_for_io(ready=True)  # the last layer: nothing left to hide a step behind
    assert not gate.pass_fits(1e-6)
    gate.end_verification()
    assert ComputeGate(lockstep=True, layers=4).pass_fits(60.0)  # tests' lockstep: every step runs


def test_a_yielding_draft_wakes_for_the_next_io_wait():
    """The draft gives a wait back (the layer was nearly read) and must get the next wait, even when
    the target resumes and blocks again before the draft thread runs."""
    gate = ComputeGate()
    gate.begin_verification()
    gate.target_waits_for_io(ready=False)
    assert gate.draft_turn() is True
    yielded = threading.Thread(target=gate.draft_yield)
    yielded.start()
    gate.target_resumes()
    gate.target_waits_for_io(ready=False)  # the next layer's wait begins at once
    yielded.join(timeout=10)
    assert not yielded.is_alive(), "the draft slept through the next IO wait"
    assert gate.draft_turn() is True
    gate.draft_step_done()
    gate.end_verification()


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_seeded_sampling_streamed_and_pipelined_equals_target_only(tiny_pair_dirs, tiny_models, tiny_tokenizer,
                                                                   budgets, family):
    """A sampled run of the pipelined llmcad mode (provisional trees, streamed target) reproduces the
    resident target-only run with the same seed, token for token."""
    from llmcad.speculative.policy import make_policy

    ids = tiny_tokenizer(PROMPT)["input_ids"]
    sampling = dict(do_sample=True, temperature=0.9, top_k=30, seed=11)
    want = LLMCad(tiny_models(family, "shared"), tiny_models(family, "target"), tiny_tokenizer,
                  make_policy("target-only")).generate(ids, NEW_TOKENS, **sampling).tokens
    for lockstep in (True, False):
        with streamed_engine(tiny_pair_dirs, budgets, "shared", family=family, lockstep=lockstep) as engine:
            result = engine.generate(ids, NEW_TOKENS, **sampling)
        assert result.tokens == want, lockstep
        assert result.stats["pipeline"] is True


def test_summary_reports_the_provisional_nodes_the_next_trees_used():
    from llmcad.stats import summary

    stats = {"pipeline": True, "provisional_drafted": 40, "provisional_followed": 32, "provisional_reused": 8,
             "provisional_reuse": 0.25}
    line = [x for x in summary(stats).splitlines() if "provisional" in x]
    assert line == ["llmcad: provisional : 40 nodes grown during reads; of the 32 in passes a later pass followed, "
                    "8 started the next tree (25%)"]
    assert "provisional" not in summary({"pipeline": False})


def test_beside_compute_rule_finds_a_contended_device_slower_and_a_free_one_faster():
    """Fed what a 2-core CPU shows (target and draft about 2x slower beside each other) the rule turns
    drafting beside compute off; fed a device with room (5% and 10%), on for steps worth more than the
    compute they cost; unmeasured after its probes (a probe that compared nothing is tried again), off."""
    from llmcad.speculative.costs import BesideCompute

    contended, free, silent = BesideCompute(), BesideCompute(), BesideCompute()
    assert contended.mode() == "probe" and contended.pays(0.0)
    contended.observe_probe([0.10, 0.11, 0.10, 0.50], [0.22, 0.21, 0.23])  # one odd layer alone
    contended.observe_step(0.53, 0.24)
    assert contended.slowdowns()[0] == pytest.approx(0.22 / 0.105)
    assert contended.threshold() > 1 and contended.mode() == "off" and not contended.pays(0.99)
    free.observe_probe([0.10, 0.10, 0.10], [0.105, 0.105, 0.105])
    free.observe_step(0.264, 0.24)
    assert free.mode() == "on" and free.threshold() == pytest.approx(1.1 * (1 - 1 / 1.05))
    assert free.pays(0.3) and not free.pays(0.02)
    for _ in range(BesideCompute.PROBE_TRIES):  # a probe that compares nothing is tried again, up to a bound
        assert silent.mode() == "probe"
        silent.observe_probe([0.1], [])  # too few layers to compare
    assert silent.mode() == "off" and silent.describe()["probe_tries"] == BesideCompute.PROBE_TRIES
    late = BesideCompute()  # two probes that compared nothing, then one that did: measured, not off
    late.observe_probe([0.1], [])
    late.observe_probe([0.1] * 3, [0.2])
    assert late.mode() == "probe"
    late.observe_probe([0.10, 0.10, 0.10], [0.105, 0.105, 0.105])
    late.observe_step(0.264, 0.24)
    assert late.mode() == "on" and late.describe()["probe_passes"] == 1
    unslowed = BesideCompute()  # the target no slower beside a step: on, with no step of the draft's measured
    unslowed.observe_probe([0.10, 0.10, 0.10], [0.099, 0.10, 0.098])
    unslowed.observe_probe([0.10, 0.10, 0.10], [0.10, 0.10, 0.10])
    assert unslowed.slowdowns()[1] is None and unslowed.threshold() == 0.0 and unslowed.mode() == "on"
    assert unslowed.pays(0.01)
    assert BesideCompute(enabled=False).mode() == "disabled"
    described = contended.describe()
    assert described["mode"] == "off" and described["target_measurements"] == 1


def test_gate_lets_the_draft_step_beside_compute_in_the_first_half_of_a_probe():
    """A probe over 4 streamed layers: while the target computes its first two, the draft may step beside
    it (the target does not wait for that step); from the third, only in IO waits. Layers are filed
    alone or beside by the draft steps that overlapped them."""
    gate = ComputeGate(layers=4)
    gate.begin_verification("probe")
    assert gate.may_step_beside() and gate.draft_turn() is True  # the target computes: beside
    gate.step_beside = True
    gate.target_waits_for_io(ready=True)  # layer 1, ready at once
    gate.target_resumes()  # does not wait for the step in flight
    time.sleep(0.02)
    gate.target_waits_for_io(ready=True)  # layer 2
    assert gate.pass_layers["beside"] and not gate.pass_layers["alone"]
    gate.target_resumes()
    assert gate.draft_step_done() > 0.5
    gate.target_waits_for_io(ready=True)  # layer 3: past half-way
    assert not gate.may_step_beside()
    gate.target_resumes()
    turns = []
    drafter = threading.Thread(target=lambda: turns.append(gate.draft_turn()))
    drafter.start()
    drafter.join(timeout=0.2)
    assert drafter.is_alive() and turns == []  # the target computes: no step
    gate.target_waits_for_io(ready=True)
    assert len(gate.pass_layers["alone"]) == 1
    gate.end_verification()
    drafter.join(timeout=10)
    assert turns == [False]


def test_provisional_growth_is_bounded_by_four_trees_by_default(tiny_pair_dirs, tiny_models, tiny_tokenizer,
                                                               budgets, monkeypatch):
    """Best-first provisional drafting may grow four times the size bound's nodes a verification (checked
    before each draft step), and the stats count what it grew. Lockstep drafts until that bound or the
    candidates stop it."""
    bounds, grown = [], []
    verify, draft = VerifyWorker.verify, VerifyWorker._draft_best_first

    def spy_verify(self, tree, n, max_provisional, policy=None, max_depth=0):
        bounds.append((max_provisional, policy.max_tree_tokens))
        return verify(self, tree, n, max_provisional, policy, max_depth)

    def spy_draft(self, tree, n, max_provisional, policy, max_depth):
        nodes = draft(self, tree, n, max_provisional, policy, max_depth)
        grown.append(len(nodes))
        return nodes

    monkeypatch.setattr(VerifyWorker, "verify", spy_verify)
    monkeypatch.setattr(VerifyWorker, "_draft_best_first", spy_draft)
    with streamed_engine(tiny_pair_dirs, budgets, "unrelated", lockstep=True, max_tree_tokens=16) as engine:
        s = _check_lossless(engine, tiny_models, tiny_tokenizer)
    assert bounds and all(bound == 4 * size == 64 for bound, size in bounds)
    assert sum(grown) == s["provisional_drafted"] > 0
