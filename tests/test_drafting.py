"""Best-first batched drafting: the rows' masks and positions against a NumPy oracle and against plain
forwards, tree bookkeeping, and the cost rule's decisions with a simulated draft of known acceptance."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import tree_reference as ref
from llmcad.speculative import kv
from llmcad.speculative.costs import AcceptanceCalibration, LinearCost, LookupCalibration
from llmcad.speculative.draft import DraftTree, TreeDrafter, rows_mask
from llmcad.speculative.lookup import PromptLookup
from llmcad.speculative.pipeline import bonus_subtree
from llmcad.speculative.policy import LLMCadPolicy, make_policy
from llmcad.stats import policy_line

PROMPT = "def add(a, b):"


def random_run_state(rng, n):
    """A random tree whose first nodes ran in a random order that still runs parents first, and the
    unrun nodes whose parents all ran (the ones a step may expand)."""
    parents = ref.random_tree(rng, n)
    run = [0]
    for node in range(1, n):
        if parents[node] in run and rng.random() < 0.6:
            run.append(node)
    order = [0] + sorted(run[1:], key=lambda _: rng.random())
    order = sorted(order, key=lambda u: ref.depths(parents)[u])  # parents before children
    slots = np.full(n, -1, dtype=np.int64)
    for i, node in enumerate(order):
        slots[node] = i
    if len(order) > 1 and all(slots[u] >= 0 or slots[parents[u]] < 0 for u in range(1, n)):
        slots[order.pop()] = -1  # the deepest run node has no run child: un-run it, so it can be expanded
    ready = [u for u in range(1, n) if slots[u] < 0 and slots[parents[u]] >= 0]
    assert ready
    return parents, slots, len(order), ready


@pytest.mark.parametrize("n,prefix", [(2, 0), (7, 1), (33, 63), (65, 64), (130, 5)])
def test_rows_mask_matches_the_numpy_oracle(n, prefix):
    rng = np.random.default_rng(n * 1000 + prefix)
    parents, slots, ran, ready = random_run_state(rng, n)
    for count in sorted({1, len(ready) // 2, len(ready)} - {0}):
        nodes = list(rng.permutation(ready)[:count])
        for dtype, np_dtype in ((torch.float32, np.float32), (torch.bfloat16, np.float32)):
            mask = rows_mask(parents.tolist(), slots.tolist(), nodes, prefix, ran, dtype)
            assert mask.dtype == dtype and mask.shape == (1, 1, count, prefix + ran + count)
            np.testing.assert_array_equal(mask[0, 0].float().numpy(),
                                          ref.draft_rows_mask(parents, slots, nodes, prefix, ran, np_dtype))


def test_rows_mask_refuses_unrun_ancestors_and_rerun_nodes():
    parents, slots = [-1, 0, 1], [0, -1, -1]
    with pytest.raises(ValueError, match="ancestor 1"):
        rows_mask(parents, slots, [2], 4, 1)
    with pytest.raises(ValueError, match="has run already"):
        rows_mask(parents, slots, [0], 4, 1)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "phi3"])
def test_batched_rows_give_the_logits_of_plain_forwards(tiny_models, tiny_tokenizer, family):
    """Grow a tree best-first (several rows a step); every run node's draft distribution equals a
    plain forward of prompt + its path, and the cache holds prefix + one key per run node."""
    draft = tiny_models(family, "shared")
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    policy = LLMCadPolicy(max_tree_tokens=24, max_depth=4)
    policy.draft_cost = LinearCost(1.0, 1e-6)  # a fixed cost dominates: wide steps
    policy.target_cost = LinearCost(100.0, 1e-6)  # and passes are dear: drafting pays
    seen = {}
    drafter = TreeDrafter(draft, ids)
    original = drafter._run_rows

    def recording(tree, nodes, pol, name="draft"):
        top_p, top_t = original(tree, nodes, pol, name)
        for row, node in enumerate(nodes):
            seen[node] = (tree_path(tree, node), top_p[row], top_t[row])
        return top_p, top_t

    drafter._run_rows = recording
    tree = drafter.grow(ids[-1], policy, depth_cap=10)
    assert max(policy.sizes["draft_rows"]) > 1, "no batched step ran"
    for path, top_p, top_t in seen.values():  # each row's top tokens, with their probabilities
        with torch.no_grad():
            plain = torch.softmax(draft(torch.tensor([ids[:-1] + path])).logits[0, -1].float(), dim=-1)
        torch.testing.assert_close(top_p, plain[top_t], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(top_p, torch.topk(plain, k=len(top_p)).values, rtol=1e-4, atol=1e-5)
    ran = sum(1 for s in tree.slot if s >= 0)
    assert kv.cache_length(drafter.cache) >= len(ids) - 1 + ran
    for node in range(1, len(tree)):  # best first: values never grow down a path, parents come first
        assert tree.parents[node] < node and tree.value[node] <= tree.value[tree.parents[node]]
    assert tree.value == sorted(tree.value, reverse=True)


def tree_path(tree, node):
    path = []
    while node >= 0:
        path.append(tree.tokens[node])
        node = tree.parents[node]
    return path[::-1]


def test_select_subtree_and_bonus_seed():
    t = DraftTree.rooted(9)
    t.slot[0] = 0
    a = t.add(0, 1, 0.6, 0.5)
    b = t.add(0, 2, 0.3, 0.2)
    t.slot[a] = 1
    c = t.add(a, 3, 0.9, 0.4)
    d = t.add(a, 4, 0.05, 0.01)
    t.slot[c] = 2
    e = t.add(c, 5, 0.8, 0.3)
    assert t.subtree(a) == [a, c, d, e] and t.subtree(b) == [b]
    assert t.best_first_order(max_depth=5) == [0, a, c, e, b, d]
    assert t.best_first_order(max_depth=1) == [0, a, b]
    sub = t.select([a, c, d, e])
    assert sub.tokens == [1, 3, 4, 5] and sub.parents == [-1, 0, 0, 1] and sub.depth == [0, 1, 1, 2]
    assert sub.slot == [1, 2, -1, -1] and sub.value[1] == pytest.approx(0.8)
    # the target accepted [0] and chose 1: the subtree under a seeds the next tree (a ran)
    assert bonus_subtree(t, [0], 1, max_depth=5) == [a, c, d, e]
    assert bonus_subtree(t, [0], 1, max_depth=1) == [a, c, d]
    assert bonus_subtree(t, [0], 2, max_depth=5) == []  # b never ran: nothing to reuse
    assert bonus_subtree(t, [0, a], 7, max_depth=5) == []  # no child with the bonus token


def test_calibration_learns_acceptance_and_keeps_a_prior():
    cal = AcceptanceCalibration(buckets=10, prior_weight=4)
    assert cal(0.95) == pytest.approx(0.95) and cal(0.05) == pytest.approx(0.05)
    for i in range(400):  # a draft that is overconfident: p = 0.9 accepted half the time
        cal.observe(0.9, i % 2 == 0)
    assert cal(0.9) == pytest.approx((200 + 4 * 0.95) / 404)
    assert cal(0.5) == pytest.approx(0.55)  # other bins keep their prior
    t = DraftTree.rooted(0)
    a = t.add(0, 1, 0.35)
    t.add(0, 2, 0.35)
    t.add(a, 3, 0.35)
    cal.observe_tree(t, [0, a])  # nodes 1, 2 tested under the root, 3 under a: one of three accepted... and 3 missed
    assert cal.seen[3] == 3 and cal.accepted[3] == 1


def test_linear_cost_fits_measurements():
    cost = LinearCost(1.0, 0.01)
    for rows in (1, 8, 32, 64) * 10:
        cost.observe(rows, 0.2 + 0.003 * rows)
    fixed, per_row = cost.coefficients()
    assert fixed == pytest.approx(0.2, rel=0.05) and per_row == pytest.approx(0.003, rel=0.05)
    cost.observe(4, float("nan"))  # ignored
    assert cost(10) == pytest.approx(0.23, rel=0.05)


def test_linear_cost_keeps_the_prior_shape_when_sizes_are_alike():
    """Passes of nearly one size cannot tell a slope from their noise: the fit keeps the prior's shape
    (per row / fixed) at the measured level, never a zero per-row cost (which grew 512-node trees)."""
    cost = LinearCost(1.0, 0.02)
    for rows, seconds in ((75, 0.93), (72, 0.95), (78, 0.90)):  # seconds fall as rows rise: noise
        cost.observe(rows, seconds)
    fixed, per_row = cost.coefficients()
    scale = 0.93 / (1.0 + 0.02 * 75)  # the median measurement over the prior's line
    assert fixed == pytest.approx(scale) and per_row == pytest.approx(0.02 * scale)
    assert cost.describe()["slope_from"] == "prior shape"
    for rows, seconds in ((20, 0.40), (40, 0.60)):  # sizes apart: the slope is measured
        cost.observe(rows, seconds)
    assert cost.describe()["slope_from"] == "measured" and cost.coefficients()[1] > 0


def test_the_prompt_pass_probes_a_token_s_compute(monkeypatch):
    """A prompt's pass of 150 rows at 0.3 s a row (bf16 on an AVX2 CPU) prices the first trees' tokens
    at that, not the prior's 20 ms; then passes of one size, too alike for a slope, keep the probed
    shape (before, their 4.8 s read as fixed cost and the tree as 50 nearly free nodes). No token of a
    compute-bound pass is free, so the bound is the largest and the prices alone size the tree."""
    slow, fast = make_policy("llmcad"), make_policy("llmcad")
    assert slow.tree_tokens == LLMCadPolicy.INITIAL_TREE_TOKENS  # nothing measured yet
    slow.observe_pass(10, 45.0, pending=140)
    fast.observe_pass(10, 0.15, pending=140)  # 1 ms a row
    assert slow.tree_tokens == fast.tree_tokens == LLMCadPolicy.INITIAL_TREE_TOKENS
    assert slow.target_cost.coefficients() == pytest.approx((1.0, 0.3))
    (slow_nodes, _), (fast_nodes, _) = size_grown(slow, monkeypatch), size_grown(fast, monkeypatch)
    assert slow_nodes < fast_nodes
    for _ in range(4):
        slow.observe_pass(16, 0.3 * 16)
    fixed, per_token = slow.target_cost.coefficients()
    assert per_token == pytest.approx(0.3 * 4.8 / 5.8) and fixed == pytest.approx(4.8 / 5.8)
    assert slow.tree_tokens == LLMCadPolicy.AUTO_TREE_TOKENS[1]
    assert size_grown(slow, monkeypatch)[0] <= slow_nodes
    report = slow.report()["target_pass_model_s"]
    assert report["probe_per_token"] == pytest.approx(0.3) and report["prefill_passes_left_out"] == 1
    odd = make_policy("llmcad")  # one odd prompt pass among five moves the prior slope not at all
    for seconds in (15.0, 15.0, 150.0, 15.0, 15.0):
        odd.observe_pass(10, seconds, pending=140)
    assert odd.target_cost.coefficients()[1] == pytest.approx(0.1)
    odd.observe_pass(10, 1.0, pending=140, io_wait_s=2.0)  # waits longer than the pass: no probe
    assert odd.report()["target_pass_model_s"]["probe_per_token"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="per_row=0"):
        odd.target_cost.reshape_prior(0.0)


def test_a_prompt_pass_of_its_own_probes_without_counting_as_a_tree():
    """The prompt cached on a thread of its own (beside the draft's first tree) is a pass of 0 tree
    tokens: the same probe as a prompt with a tree riding in it, and no 0-node tree in the sizes."""
    apart, riding = make_policy("llmcad"), make_policy("llmcad")
    apart.observe_pass(0, 42.0, pending=140)
    riding.observe_pass(10, 45.0, pending=140)
    assert apart.target_cost.coefficients() == pytest.approx(riding.target_cost.coefficients())
    apart.observe_pass(12, 3.6)
    assert apart.report()["mean_tree_tokens"] == 12.0 and riding.report()["mean_tree_tokens"] == 10.0
    assert apart.report()["target_pass_model_s"]["probe_per_token"] == pytest.approx(0.3)


def test_the_verified_head_is_the_one_that_pays():
    """Of a best-first tree, the head with the most expected tokens per second of the round is verified:
    where a token costs 0.3 s of compute the unlikely children an expansion added are left out; where
    the pass waits on its reads they are free and all go; the confident nodes up to the floor always."""
    values = [1.0] + [0.9] * 7 + [0.05, 0.01]
    costly = make_policy("llmcad")
    costly.target_cost = LinearCost(0.5, 0.3)
    n = costly.verified_tokens(values, draft_s=0.5)
    rate = lambda k: (1 + sum(values[1:k])) / (0.5 + 0.5 + 0.3 * k)  # noqa: E731
    assert n == max(range(1, len(values) + 1), key=rate) == 8
    assert costly.report()["unverified_nodes"] == len(values) - 8
    # the prompt's 30 s in the pass make its own rate 0.2 tok/s, which a 0.1-value token at 0.3 s beats;
    # priced at the 2 tok/s of a round without the prompt, it does not ride along
    tail = values[:8] + [0.1, 0.1]
    assert costly.verified_tokens(tail, draft_s=0.5) == costly.verified_tokens(tail, draft_s=0.5, pending=100) == 8
    free = calibrated_policy(0.5, 0.001, io_s=8.0)  # a tree token's compute hides under 8 s of reads
    assert free.verified_tokens(values, draft_s=0.5) == len(values)
    costly.target_cost = LinearCost(0.1, 10.0)  # a token costs 10 s: still the floor's confident nodes
    assert costly.verified_tokens(values, draft_s=0.5) == 1 + sum(v >= LLMCadPolicy.CONFIDENT_VALUE
                                                                   for v in values[1:LLMCadPolicy.FLOOR_TREE_TOKENS])


def test_linear_cost_rejects_a_prior_of_no_cost():
    with pytest.raises(ValueError, match="fixed=0"):
        LinearCost(0.0, 0.0)


def test_same_size_passes_do_not_grow_the_largest_tree():
    """Three passes of about 75 tokens at 0.93 s (a resident target on a quiet CPU): the device-sized
    tree is what fits the fixed cost at the scaled prior's slope, not the 512-node bound."""
    policy = make_policy("llmcad")
    for tokens, seconds in ((75, 0.93), (72, 0.95), (78, 0.90)):
        policy.observe_pass(tokens, seconds)
    assert policy.tree_tokens == 50  # fixed / per_token = 1 / 0.02
    report = policy.report()
    assert report["target_pass_model_s"]["slope_from"] == "prior shape"
    line = policy_line(report)
    assert "fitted on 3 passes (sizes too alike for a slope" in line and "20.00 ms/node" not in line


class SimulatedDraftDrafter(TreeDrafter):
    """A draft whose every distribution is ``dist`` (top token first; its top tokens are 0, 1, ...): no
    model, slots kept as a real forward would keep them. The target accepts a token of probability p with probability p
    (a calibrated draft), so a node's true value is its path's product of probabilities."""

    def __init__(self, dist, seconds_per_row=0.002, fixed_seconds=0.05):
        super().__init__(draft=None, prompt_ids=[1, 2, 3])
        self.dist = torch.tensor(dist + [0.0] * (8 - len(dist)))
        self.tokens = torch.arange(8)
        self.fixed, self.per_row = fixed_seconds, seconds_per_row

    def _run(self, tree, node, name="draft"):
        tree.slot[node] = self._ran
        self._ran += 1
        self.pending = []
        return self.dist, self.tokens

    def _run_rows(self, tree, nodes, policy, name="draft"):
        for row, node in enumerate(nodes):
            tree.slot[node] = self._ran + row
        self._ran += len(nodes)
        self._kv_room -= len(nodes)
        self.steps += 1
        if policy is not None:
            policy.observe_draft(len(nodes), self.fixed + self.per_row * len(nodes))
        return self.dist.expand(len(nodes), -1), self.tokens.expand(len(nodes), -1)


def calibrated_policy(pass_fixed_s, pass_per_token_s, io_s=None, **options):
    """A policy that has timed passes of ``pass_fixed_s + pass_per_token_s * n`` compute (with ``io_s``:
    passes lasting max(reads, compute), the target blocked on reads for the rest), draft forwards, and
    a calibrated draft."""
    policy = make_policy("llmcad", **options)
    for n in (8, 16, 32, 64) * 10:  # enough passes for the prior to fade
        compute = pass_fixed_s + pass_per_token_s * n
        seconds = compute if io_s is None else max(io_s, compute)
        policy.observe_pass(n, seconds, io_wait_s=seconds - compute)
    for rows in (1, 4, 16, 1, 4, 16):
        policy.observe_draft(rows, 0.05 + 0.002 * rows)
    rng = np.random.default_rng(0)
    for p in rng.uniform(0, 1, 4000):  # the simulated draft is calibrated: accepted with probability p
        policy.calibration.observe(float(p), bool(rng.random() < p))
    return policy


def grow_simulated(policy, dist, monkeypatch):
    drafter = SimulatedDraftDrafter(dist)
    clock = {"t": 0.0}

    def fake_clock():  # draft time as the simulated draft costs it, not as this machine runs the test
        return clock["t"]

    original = drafter._run_rows

    def timed(tree, nodes, pol, name="draft"):
        clock["t"] += drafter.fixed + drafter.per_row * len(nodes)
        return original(tree, nodes, pol, name)

    drafter._run_rows = timed
    monkeypatch.setattr("llmcad.speculative.draft.time.perf_counter", fake_clock)
    tree = drafter.grow(0, policy, depth_cap=200)
    return tree, drafter.steps


@pytest.mark.parametrize("dist", [[0.8, 0.1, 0.05], [0.5, 0.3, 0.1]])
def test_cost_rule_verifies_earlier_when_passes_are_cheap(dist, monkeypatch):
    """The same simulated draft: with 0.1 s passes the rule stops after fewer draft forwards and a
    smaller tree than with 8 s passes (offloaded), where more drafting still pays."""
    cheap, cheap_steps = grow_simulated(calibrated_policy(0.1, 0.0005), dist, monkeypatch)
    costly, costly_steps = grow_simulated(calibrated_policy(8.0, 0.02), dist, monkeypatch)
    assert cheap_steps < costly_steps
    cheap_n = min(len(cheap), calibrated_policy(0.1, 0.0005).max_tree_tokens)
    costly_n = min(len(costly), calibrated_policy(8.0, 0.02).max_tree_tokens)
    assert cheap_n < costly_n
    expected = lambda t, n: sum(t.value[1:n])  # noqa: E731 - expected accepted draft tokens
    assert expected(cheap, cheap_n) < expected(costly, costly_n)
    # the drafting time the cheap rule spent is comparable to its pass, never many passes' worth
    assert cheap_steps * (0.05 + 0.002 * 64) < 5 * 0.2


def test_tree_size_follows_the_device():
    """Auto size: the tree grows while its compute (per token) fits in the pass's fixed (IO) time."""
    io_bound = calibrated_policy(8.0, 0.02)
    assert io_bound.max_tree_tokens == pytest.approx(400, abs=4)  # 8 s / 20 ms a token
    assert io_bound.max_depth == io_bound.max_tree_tokens - 1
    compute_bound = calibrated_policy(0.02, 0.01)
    assert compute_bound.max_tree_tokens == LLMCadPolicy.AUTO_TREE_TOKENS[0] == LLMCadPolicy.FLOOR_TREE_TOKENS
    fixed = make_policy("llmcad", max_tree_tokens=20, max_depth=6)
    fixed.observe_pass(10, 5.0)
    assert (fixed.max_tree_tokens, fixed.max_depth) == (20, 6)
    assert make_policy("llmcad").max_tree_tokens == LLMCadPolicy.INITIAL_TREE_TOKENS
    report = io_bound.report()
    assert report["max_tree_tokens_chosen"] == io_bound.max_tree_tokens
    assert report["mean_tree_tokens"] == pytest.approx(30)


def test_rows_follow_the_draft_cost():
    """Wide steps when a forward's fixed cost dominates, one row when every row costs as much."""
    policy = make_policy("llmcad")
    values = [0.9, 0.5, 0.4, 0.3, 0.2, 0.1]
    policy.draft_cost = LinearCost(0.1, 0.0001)
    assert policy.rows(values) == len(values)
    policy.draft_cost = LinearCost(0.0, 0.1)
    assert policy.rows(values) == 1


def test_io_bound_passes_make_tree_tokens_free_until_compute_catches_up():
    """Passes bound by their reads: the model is max(reads, compute); the auto size is the tokens whose
    compute fits in the reads; draft-step waits count as neither."""
    policy = calibrated_policy(0.5, 0.02, io_s=8.0)
    assert policy.io_bound_s == pytest.approx(8.0)
    assert policy.max_tree_tokens == pytest.approx((8.0 - 0.5) / 0.02, abs=2)
    assert policy.pass_seconds(10) == pytest.approx(8.0)
    assert policy.pass_seconds(500) == pytest.approx(0.5 + 0.02 * 500, rel=0.01)
    compute_only = calibrated_policy(0.5, 0.02)  # the same compute, never waiting on reads
    assert compute_only.io_bound_s is None
    assert compute_only.pass_seconds(10) == pytest.approx(0.7, rel=0.01)
    policy.observe_pass(20, 9.0, io_wait_s=0.0, draft_wait_s=8.1)  # blocked on a draft step, not on reads
    assert policy.io_bound_s == pytest.approx(8.0)
    assert policy.target_cost(20) == pytest.approx(0.5 + 0.02 * 20, abs=0.05)


def test_cost_rule_keeps_drafting_while_passes_wait_on_reads():
    """The same 70 s pass for a small tree: IO-bound, more tree tokens cost nothing while their compute
    fits in the reads, so a low-value expansion still pays; compute-bound, every token adds 1 s and the
    same expansion does not. Valuable nodes pay in both."""
    io_bound = calibrated_policy(0.5, 1.0, io_s=70.0, max_tree_tokens=64)
    compute_bound = calibrated_policy(70.0, 1.0, max_tree_tokens=64)
    low, high = [0.05] * 4, [0.9] * 4
    state = dict(floor=0.0, tree_value=3.0, tree_tokens=10, draft_s=0.5)
    assert io_bound.keep_drafting(low, **state)
    assert not compute_bound.keep_drafting(low, **state)
    assert io_bound.keep_drafting(high, **state) and compute_bound.keep_drafting(high, **state)


def test_learned_costs_and_calibration_outlive_a_generation():
    """reset() (each generate) keeps what the pair accepts and what the machine costs; forget() does not."""
    policy = calibrated_policy(0.5, 0.02, io_s=8.0)
    accepted = policy.calibration(0.95)
    policy.observe_draft(4, 0.3)
    policy.reset()
    assert policy.io_bound_s == pytest.approx(8.0)
    assert policy.calibration(0.95) == accepted
    assert policy.report()["mean_tree_tokens"] == 0.0  # the sizes are the generation's own
    policy.forget()
    assert policy.io_bound_s is None
    assert policy.calibration(0.95) == pytest.approx(0.95)


# ---- stable under load: the learned costs survive a slow phase and one odd pass


def size_grown(policy, monkeypatch, dist=(0.6, 0.2, 0.1)):
    """(tree nodes the target would verify, draft forwards) of one simulated round."""
    tree, steps = grow_simulated(policy, list(dist), monkeypatch)
    return min(len(tree), policy.max_tree_tokens), steps


def test_one_odd_pass_moves_no_cost():
    """A pass 60 times too slow (another job took the cores) leaves the fit where it was."""
    policy = calibrated_policy(1.0, 0.004)
    before = policy.target_cost.coefficients()
    policy.observe_pass(20, 60.0)
    assert policy.target_cost.coefficients() == pytest.approx(before, rel=0.02)
    cost = LinearCost(0.05, 0.002)
    for rows in (1, 4, 16) * 6:
        cost.observe(rows, 0.05 + 0.002 * rows)
    cost.observe(4, 5.0)
    cost.observe(16, 1e-6)
    assert cost.coefficients() == pytest.approx((0.05, 0.002), rel=0.02)


def test_pass_model_leaves_the_prefill_out():
    """A pass that carried 500 prompt tokens is no typical pass: the model learns nothing from it."""
    policy = calibrated_policy(1.0, 0.004)
    before, seen = policy.target_cost.coefficients(), policy.target_cost.observations
    policy.observe_pass(16, 30.0, pending=500)
    assert policy.target_cost.coefficients() == before and policy.target_cost.observations == seen
    assert policy.report()["target_pass_model_s"]["prefill_passes_left_out"] == 1


def test_slow_phase_keeps_the_chain_floor_and_recovers(monkeypatch):
    """Passes measured as all per-token cost, 15x the quiet one (the fit a loaded machine gave): the
    tree keeps at least the chain's size, and once quiet passes hold the fit's window again the
    rule chooses what it chose before."""
    policy = calibrated_policy(1.0, 0.004)
    quiet = size_grown(policy, monkeypatch)
    for n in (4, 6, 3, 5, 4, 2, 6, 3) * 2:
        policy.observe_pass(n, 0.058 * n)
    slow_nodes, slow_steps = size_grown(policy, monkeypatch)
    # the device-sized tree is the floor itself: a chain's worth of nodes, paid for within it
    assert policy.max_tree_tokens == LLMCadPolicy.FLOOR_TREE_TOKENS
    assert slow_nodes == LLMCadPolicy.FLOOR_TREE_TOKENS and slow_steps >= 1
    for n in (4, 8, 16, 20) * 3:  # the fit's window is quiet again
        policy.observe_pass(n, 1.0 + 0.004 * n)
    assert size_grown(policy, monkeypatch) == pytest.approx(quiet, rel=0.1)


def test_floor_only_for_confident_nodes():
    """Below the floor the rule drafts whatever the costs, but not a node the target would hardly take."""
    policy = calibrated_policy(0.1, 1.0, max_tree_tokens=64)  # every token adds a second: drafting never pays
    state = {"floor": 0.0, "tree_value": 5.0, "tree_tokens": 2, "draft_s": 0.5}
    assert not policy._pays([0.5], **state)
    assert policy.keep_drafting([0.5], **state, confident_nodes=1)
    assert not policy.keep_drafting([0.5], **state, confident_nodes=LLMCadPolicy.FLOOR_TREE_TOKENS - 1)
    assert not policy.keep_drafting([LLMCadPolicy.CONFIDENT_VALUE / 2], **state, confident_nodes=1)


def test_report_says_what_the_rule_measured():
    policy = calibrated_policy(1.0, 0.004)
    report = policy.report()
    model = report["target_pass_model_s"]
    assert model["fixed"] == pytest.approx(1.0) and model["per_token"] == pytest.approx(0.004)
    assert model["observations"] == 40 and model["window"] == 12
    assert report["draft_model_s"]["per_row"] == pytest.approx(0.002) and report["draft_model_s"]["observations"] == 6
    assert report["floor_tree_tokens"] == LLMCadPolicy.FLOOR_TREE_TOKENS


# ---- prompt lookup: free branches


def grow_with_history(policy, history, root, monkeypatch, dist=(0.6, 0.2, 0.1)):
    drafter = SimulatedDraftDrafter(list(dist))
    drafter.history = PromptLookup(history)
    monkeypatch.setattr("llmcad.speculative.draft.time.perf_counter", lambda: 0.0)
    return drafter.grow(root, policy, depth_cap=200)


def test_lookup_branches_merge_into_draft_children(monkeypatch):
    """The simulated draft proposes tokens 0, 1, 2 under every node; the text so far continues the
    root 0 with 0 1 7 9 (after "9 0") and 1 7 9 0 (after "0"). Lookup tokens the draft also proposes
    merge into its children: no two siblings share a token, a merged node has the draft's probability
    and a lookup key, a lookup-only node probability 0; values follow both calibrations; the draft
    runs a lookup node only after its parent."""
    policy = calibrated_policy(8.0, 0.02, max_tree_tokens=40)
    tree = grow_with_history(policy, [9, 0, 0, 1, 7, 9], 0, monkeypatch)
    for node in range(len(tree)):
        kids = [tree.tokens[c] for c in tree.children[node]]
        assert len(kids) == len(set(kids)), (node, kids)
        if tree.slot[node] > 0:
            assert 0 <= tree.slot[tree.parents[node]] < tree.slot[node]

    def path(tokens):  # the node reached from the root by ``tokens``
        node = 0
        for token in tokens:
            node = tree.child(node, token)
        return node

    merged, seven = path([0, 1]), path([0, 1, 7])
    assert tree.lookup[merged] == (2, 2) and tree.probs[merged] == pytest.approx(0.2)
    assert tree.lookup[seven] == (2, 3) and tree.probs[seven] == 0.0
    assert tree.value[seven] == pytest.approx(tree.value[merged] * policy.lookup_calibration((2, 3)))
    assert tree.lookup[path([1])] == (1, 1) and tree.probs[path([1])] == pytest.approx(0.2)
    assert tree.value[merged] == pytest.approx(tree.value[path([0])] * max(
        policy.calibration(0.2), policy.lookup_calibration((2, 2))))


def test_lookup_branches_stay_within_the_caps(monkeypatch):
    """A long copy under a tight size and depth: the tree the target verifies keeps to both."""
    policy = calibrated_policy(8.0, 0.02, max_tree_tokens=5, max_depth=3)
    history = list(range(10, 40)) + [5] + list(range(10, 40))
    tree = grow_with_history(policy, history, 5, monkeypatch)
    assert max(tree.depth) <= 3
    assert any(key is not None for key in tree.lookup)
    off = grow_with_history(calibrated_policy(8.0, 0.02, max_tree_tokens=5, max_depth=3, prompt_lookup=False),
                            history, 5, monkeypatch)
    assert all(key is None for key in off.lookup)


def test_lookup_calibration_learns_per_key():
    cal = LookupCalibration(places=4, prior=0.3, prior_weight=2)
    assert cal((3, 1)) == pytest.approx(0.3)
    t = DraftTree.rooted(0)
    a = t.add(0, 5, 0.0, lookup=(3, 1))
    t.add(a, 6, 0.0, lookup=(3, 2))
    t.add(0, 7, 0.4)  # a draft node: not the lookup's to learn from
    for _ in range(8):
        cal.observe_tree(t, [0, a])  # (3, 1) accepted, (3, 2) tested and rejected
    assert cal((3, 1)) == pytest.approx((8 + 0.6) / 10) and cal((3, 2)) == pytest.approx(0.6 / 10)
    assert cal((3, 9)) == cal((3, 4)) and cal((2, 1)) == pytest.approx(0.3)  # places beyond 4 pooled
    draft_cal = AcceptanceCalibration()
    draft_cal.observe_tree(t, [0, a])
    assert sum(draft_cal.seen) == 1  # only the draft's node 7


# ---- provisional drafting: where the next root may land


class _ProductPolicy:
    """Calibration = the draft's probability (weights by hand)."""

    @staticmethod
    def value(parent_value, prob, lookup=None):
        return parent_value * prob


def test_unverified_nodes_weigh_the_chance_that_the_next_root_is_theirs():
    """A child c of a verified node u becomes the next root with P(reach u) * P(emit c), the emission at
    most what u's verified children leave; below c, acceptance as in any tree; verified nodes keep P(reach)."""
    from llmcad.speculative.pipeline import stop_mass, weigh_unverified

    t = DraftTree.rooted(9)
    a = t.add(0, 1, 0.7)
    b = t.add(a, 2, 0.6)  # the verified tree: root, a, b
    c = t.add(0, 3, 0.5)  # beside a: the root's verified children leave 0.3
    d = t.add(c, 4, 0.5)
    e = t.add(b, 5, 0.9)  # under the verified leaf b: nothing taken
    f = t.add(a, 6, 0.2)  # beside b: a's verified children leave 0.4
    policy = _ProductPolicy()
    assert stop_mass(t, 0, 3, policy) == pytest.approx(0.3) and stop_mass(t, b, 3, policy) == 1.0
    weigh_unverified(t, 3, policy)
    assert t.value[:3] == pytest.approx([1.0, 0.7, 0.42])
    assert t.value[c] == pytest.approx(0.3) and t.value[d] == pytest.approx(0.15)
    assert t.value[e] == pytest.approx(0.42 * 0.9) and t.value[f] == pytest.approx(0.7 * 0.2)


def test_best_first_growth_keeps_the_top_tokens_left_out(monkeypatch):
    """Every run node of the verified tree keeps (under its id in that tree) the top tokens of its forward
    that did not become its children: those past the children examined, and those under the bar."""
    policy = calibrated_policy(8.0, 0.02, max_tree_tokens=12)
    drafter = SimulatedDraftDrafter([0.4, 0.25, 0.15, 0.1, 0.05, 0.03])
    monkeypatch.setattr("llmcad.speculative.draft.time.perf_counter", lambda: 0.0)
    tree = drafter.grow(0, policy, depth_cap=200)
    assert drafter.spare and 0 in drafter.spare
    for node, tokens in drafter.spare.items():
        assert tree.slot[node] >= 0
        kids = {tree.tokens[c] for c in tree.children[node]}
        left_out = {t for t, _ in tokens}
        assert {4, 5} <= left_out and not left_out & kids and kids | left_out == set(range(6))
        assert all(p == pytest.approx(drafter.dist[t]) for t, p in tokens)


def test_provisional_drafting_grows_an_interior_alternative_and_the_next_tree_starts_there(monkeypatch):
    """Verified: root -> a -> b (b not run). The root's left-out token 5 (p 0.4, within the 0.45 its child
    a leaves) is a likelier next root than a child of b (0.55 * 0.55): with one row a step, provisional
    drafting runs token 5 under the root first. The target stops at the root with bonus 5: the next tree
    is that subtree, its drafted children included."""
    from llmcad.speculative.pipeline import ComputeGate, VerifyWorker, bonus_subtree

    policy = calibrated_policy(8.0, 0.02)
    monkeypatch.setattr(policy, "rows", lambda values, during_pass=False: 1)
    drafter = SimulatedDraftDrafter([0.6, 0.2, 0.1, 0.05])
    tree = DraftTree.rooted(9)
    a = tree.add(0, 0, 0.55, 0.55)
    b = tree.add(a, 0, 0.55, 0.55 * 0.55)
    tree.slot[0], tree.slot[a], drafter._ran, drafter.pending = 0, 1, 2, []
    drafter.spare = {0: [(5, 0.4)], a: [(6, 0.05)]}
    gate = ComputeGate(lockstep=True)

    class Verifier:
        def run(self, tokens, parents):
            gate.target_waits_for_io(False)
            gate.target_resumes()  # lockstep: once the draft has stopped
            return torch.zeros(len(tokens), 8)

    with VerifyWorker(Verifier(), drafter, gate, layer_ready=lambda: False) as worker:
        _, provisional = worker.verify(tree, 3, 1, policy, max_depth=10)
    five = tree.child(0, 5)
    assert five is not None and tree.slot[five] >= 0 and tree.slot[b] < 0
    assert provisional == [five, *tree.children[five]] and len(tree.children[five]) == 4
    assert drafter.spare[0] == []
    seed = bonus_subtree(tree, [0], 5, max_depth=10)
    assert seed == [five, *tree.children[five]]
    drafter.commit(tree, [0], seed)
    nxt = drafter.grow(5, policy, depth_cap=1)
    assert nxt.tokens[0] == 5 and sorted(nxt.tokens[1:5]) == [0, 1, 2, 3]


@pytest.mark.parametrize("slowdowns, beside", [((1.05, 1.1), True), ((2.1, 2.2), False)])
def test_provisional_steps_beside_compute_only_where_the_measured_slowdowns_pay(slowdowns, beside):
    """A target that never waits on a read: the draft grows provisional nodes beside its compute when the
    rule measured small slowdowns (a device with room), and none when it measured a contended one."""
    from llmcad.speculative.costs import BesideCompute
    from llmcad.speculative.pipeline import ComputeGate, VerifyWorker

    rule = BesideCompute()
    rule.observe_probe([0.1] * 3, [0.1 * slowdowns[0]] * 3)
    rule.observe_step(0.24 * slowdowns[1], 0.24)
    assert rule.mode() == ("on" if beside else "off")
    policy = calibrated_policy(8.0, 0.02)
    drafter = SimulatedDraftDrafter([0.6, 0.2, 0.1, 0.05])
    tree = DraftTree.rooted(9)
    a = tree.add(0, 0, 0.6, 0.6)
    tree.slot[0], drafter._ran, drafter.pending = 0, 1, []
    gate = ComputeGate(layers=4)

    class Verifier:
        def run(self, tokens, parents):
            for _ in range(4):  # every layer read in time: compute only
                gate.target_waits_for_io(True)
                gate.target_resumes()
                time.sleep(0.02)
            return torch.zeros(len(tokens), 8)

    with VerifyWorker(Verifier(), drafter, gate, layer_ready=lambda: True, beside=rule) as worker:
        _, provisional = worker.verify(tree, 2, 8, policy, max_depth=10)
    assert bool(provisional) is beside and (rule.steps_beside > 0) is beside
    assert tree.slot[a] >= 0 if beside else tree.slot[a] < 0


def test_io_bound_pass_prices_the_compute_its_reads_cannot_hide():
    policy = LLMCadPolicy()
    policy.unhidden_share = 0.25
    for tokens in (20, 40, 80):  # compute 0.2 s + 10 ms a token, 8 s of reads the rest hides
        compute = 0.2 + 0.01 * tokens
        policy.observe_pass(tokens, compute + 8.0 - 0.75 * compute, io_wait_s=8.0 - 0.75 * compute)
    assert policy.io_bound_s == pytest.approx(8.0)
    assert policy.pass_seconds(100) == pytest.approx(0.25 * 1.2 + 8.0)
    assert policy.pass_seconds(300) - policy.pass_seconds(200) == pytest.approx(0.25 * 1.0)
    hidden_fits = policy.tree_tokens  # the hidden compute fits in the reads: 0.75 * (0.2 + 0.01 t) <= 8
    assert hidden_fits == min(LLMCadPolicy.AUTO_TREE_TOKENS[1], int((8.0 / 0.75 - 0.2) / 0.01))
    policy.unhidden_share = 0.0  # every node's compute hidden: a tree token costs an IO-bound pass nothing
    assert policy.pass_seconds(300) == policy.pass_seconds(200)


def test_unhidden_share_is_the_head_and_the_resident_layers_after_the_last_read():
    from types import SimpleNamespace

    from llmcad.engine import unhidden_compute_share

    layers = [torch.nn.Linear(5, 5, bias=False) for _ in range(5)]  # 100 bytes each in float32
    # layers 1 and 4 resident (100 bytes each) beside 200 bytes of head; 0, 2, 3 streamed (900 bytes)
    placement = SimpleNamespace(bytes_per_pass=900, resident_layers=[1, 4], streamed_layers=[0, 2, 3])
    streamed = SimpleNamespace(resident_bytes=400, layers=layers, placement=placement)
    # layer 1 computes while layer 2 is read; layer 4, after the last read, and the head do not
    assert unhidden_compute_share(streamed) == pytest.approx(300 / 1300)
    placement.resident_layers, placement.streamed_layers = [0, 1], [2, 3, 4]
    assert unhidden_compute_share(streamed) == pytest.approx(200 / 1300)
    assert unhidden_compute_share(None) == 0.0
    nothing_streamed = SimpleNamespace(resident_bytes=300, layers=layers, placement=SimpleNamespace(
        bytes_per_pass=0, resident_layers=[0, 1, 2], streamed_layers=[]))
    assert unhidden_compute_share(nothing_streamed) == 0.0
