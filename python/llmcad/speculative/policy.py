"""Verification policies: when to stop drafting and run the target. One engine, one policy object.

Every policy exposes ``branch_threshold`` (None: no branches), ``max_tree_tokens`` (nodes, root
included), ``max_depth`` (draft tokens on a branch), ``drafts`` (False: the draft is never run),
``should_verify(tree)`` (asked before each draft step; limits are enforced by the drafter) and
``observe(tree, accepted)`` (called after each verification).

Part of llmcad.speculative: must not import llmcad.streaming, llmcad.models, llmcad.bench or the engine.
"""
from __future__ import annotations

import collections
import itertools
import math
import statistics

from llmcad.speculative.costs import (
    AcceptanceCalibration,
    LinearCost,
    LookupCalibration,
    ema,
)


class Policy:
    name = "base"
    drafts = True
    branch_threshold = None
    tree_tokens = 1  # the mode's own tree size; max_tree_tokens is it within the memory cap
    max_depth = 0
    memory_cap = None  # tree tokens the memory budget's largest pass holds (the engine sets it); None: no cap
    # share of a streamed pass's compute its reads cannot hide (resident layers, output head: the engine
    # sets it from their bytes); 0: a pass lasts max(compute, reads)
    unhidden_share = 0.0

    @property
    def max_tree_tokens(self) -> int:
        return self.capped(self.tree_tokens)

    def capped(self, tokens: int) -> int:
        """``tokens`` within the memory cap (at least the root)."""
        return tokens if self.memory_cap is None else max(1, min(tokens, self.memory_cap))

    def reset(self) -> None:
        """Forget state from a previous generation."""

    def should_verify(self, tree) -> bool:
        return False

    best_first = False  # True: llmcad.speculative.draft grows the tree best-first, batched (the cost rule)

    def observe(self, tree, accepted) -> None:
        """Update after a verification (``accepted``: node ids, root first)."""

    def observe_pass(self, tree_tokens: int, seconds: float, pending: int = 0, io_wait_s: float = 0.0,
                     draft_wait_s: float = 0.0) -> None:
        """A target pass over ``tree_tokens`` nodes (and ``pending`` prompt tokens) took ``seconds``, of
        which it sat ``io_wait_s`` blocked on weight reads and ``draft_wait_s`` on a draft step."""

    def observe_draft(self, rows: int, seconds: float, during_pass: bool = False) -> None:
        """A draft forward of ``rows`` tree nodes took ``seconds``; ``during_pass``: while a target pass
        waited on its reads (provisional drafting, on the threads the draft shares with the pass)."""

    def report(self) -> dict:
        """Sizes the policy chose while generating (merged into the stats)."""
        return {}

    def describe(self) -> dict:
        return {"mode": self.name, **{k: getattr(self, k) for k in OPTIONS.get(self.name, ())}}


class TargetOnlyPolicy(Policy):
    """One token per target pass: the tree is the root alone; the draft is never run."""

    name = "target-only"
    drafts = False


class ChainPolicy(Policy):
    """A fixed-length chain of the draft's argmax tokens (Leviathan-style), no branches."""

    name = "chain"

    def __init__(self, chain_length: int = 5):
        self.chain_length = _positive_int("chain_length", chain_length)
        self.max_depth = self.chain_length
        self.tree_tokens = self.chain_length + 1


class TreePolicy(Policy):
    """A fixed-size tree: draft until ``max_tree_tokens`` nodes (or ``max_depth`` everywhere)."""

    name = "tree"

    def __init__(self, max_tree_tokens: int = 32, max_depth: int = 10, branch_threshold: float = 0.3):
        self.tree_tokens = _positive_int("max_tree_tokens", max_tree_tokens, minimum=2)
        self.max_depth = _positive_int("max_depth", max_depth)
        self.branch_threshold = _fraction("branch_threshold", branch_threshold)


class LLMCadPolicy(Policy):
    """LLMCad: grow a tree, verify it once it is no longer worth growing.

    ``alpha_rule="cost"`` (default): best-first growth (see llmcad.speculative.draft), every node valued by
    the calibrated probability that the target accepts its whole path (:class:`AcceptanceCalibration`).
    The next expansion (the ``rows`` most valuable unexpanded nodes, in one draft forward) is made
    while its expected gain in accepted tokens per second it costs (draft forward + the target compute
    its new nodes add) beats the expected tokens per second of the round so far; both costs are
    measured while generating: compute linear in the tree's tokens (:class:`LinearCost`), the reads
    measured on passes that waited for them; a streamed pass lasts the compute its reads cannot hide
    (``unhidden_share``: its output head's, and its resident layers' after the last read) plus
    max(the rest, the reads), so while it is IO-bound a tree token costs only that unhidden share of
    its compute. This is the
    paper's "verify when the tree's confidence drops below alpha", with alpha set by the hardware. ``max_tree_tokens`` /
    ``max_depth`` None: sized to the device, the tree grows while the target's pass stays IO-bound
    (its hidden compute fits in the reads' time; with no read waits seen, while the tokens' compute fits in
    the pass's fixed cost).
    ``branch_threshold``: None: a node's children are its top tokens whose path value clears the
    current bar; a number: the argmax plus tokens above it (the paper's rule).
    ``prompt_lookup`` (cost rule only; default on): prompt-lookup continuations of the text so far
    (llmcad.speculative.lookup) join the tree as branches at no draft forward, each node valued by its
    own calibrated acceptance (:class:`LookupCalibration`), so the rule prices them like draft nodes.

    Robust under load: a pass that carried the prompt's prefill is kept out of the pass model's fit,
    the costs are median-based fits of recent measurements (:class:`LinearCost`), and below
    ``FLOOR_TREE_TOKENS`` nodes (what the chain mode verifies) of path value at least ``CONFIDENT_VALUE``
    the tree keeps growing whatever the costs, while its best unexpanded node is that confident. The
    prompt's pass is a free probe of the compute a token costs: the median of the last prompt passes'
    seconds per row is the pass model's prior slope (its fixed cost stays the prior's), which prices
    the first trees and shapes the model while the passes' sizes are too alike for a measured slope.
    With a probed slope and no pass bound by its reads, no tree token is free and the size bound is
    ``AUTO_TREE_TOKENS``' upper one (``INITIAL_TREE_TOKENS`` before two passes): the rule's prices
    alone size the tree. A device-sized tree is never below ``FLOOR_TREE_TOKENS``.

    ``alpha_rule="paper"``: the paper's equation. Verify once the tree confidence T_c = max_i C_i drops
    below ``alpha``; after a verification, on the branch that matched best (the one holding the
    accepted path, followed down first-created children): all of it accepted -> ``alpha *= 0.5``;
    otherwise ``alpha = (N_all - N_correct) / N_all``. Defaults 32 tokens, depth 10, threshold 0.3.
    """

    name = "llmcad"
    INITIAL_TREE_TOKENS = 64  # bound of the tree before two target passes have been timed
    IO_BOUND_SHARE = 0.05  # a pass that waited on reads this share of its time was bound by them
    FLOOR_TREE_TOKENS = 6  # the chain mode's tree (5 draft tokens and the root)
    AUTO_TREE_TOKENS = (FLOOR_TREE_TOKENS, 512)  # bounds of the device-sized tree
    MAX_ROWS = 64  # bound on the rows of one draft forward
    PROBES = 5  # prompt passes whose seconds per row make the prior slope (median)
    CONFIDENT_VALUE = 0.1  # path value of a node worth drafting below the floor

    def __init__(self, max_tree_tokens=None, max_depth=None, branch_threshold=None, alpha=None,
                 alpha_rule: str = "cost", prompt_lookup=None):
        if alpha_rule not in ("cost", "paper"):
            raise ValueError(f"alpha_rule={alpha_rule!r}: expected 'cost' or 'paper'")
        if prompt_lookup is not None and not isinstance(prompt_lookup, bool):
            raise ValueError(f"prompt_lookup={prompt_lookup!r}: expected True, False or None")
        if prompt_lookup and alpha_rule != "cost":
            raise ValueError("prompt_lookup needs alpha_rule='cost' (the paper's rule grows no valued branches)")
        self.alpha_rule = alpha_rule
        self.best_first = alpha_rule == "cost"
        self.prompt_lookup = self.best_first if prompt_lookup is None else prompt_lookup
        if not self.best_first:
            max_tree_tokens = 32 if max_tree_tokens is None else max_tree_tokens
            max_depth = 10 if max_depth is None else max_depth
            branch_threshold = 0.3 if branch_threshold is None else branch_threshold
            alpha = 0.01 if alpha is None else alpha
        elif alpha is not None:
            raise ValueError("alpha is the paper's rule's threshold: give alpha_rule='paper' with it")
        self.fixed_tree_tokens = None if max_tree_tokens is None else _positive_int(
            "max_tree_tokens", max_tree_tokens, minimum=2)
        self.fixed_depth = None if max_depth is None else _positive_int("max_depth", max_depth)
        self.branch_threshold = None if branch_threshold is None else _fraction("branch_threshold",
                                                                                branch_threshold)
        self.initial_alpha = None if alpha is None else _fraction("alpha", alpha)
        self.calibration = AcceptanceCalibration()
        self.lookup_calibration = LookupCalibration()
        self.forget()

    def reset(self) -> None:
        """A new generation: the paper's alpha restarts; what the pair accepts and what the machine's
        passes and draft forwards cost carry over (they describe the hardware, not the text)."""
        self.alpha = self.initial_alpha
        self.sizes = {"verified_tree_tokens": [], "draft_rows": []}
        # lookup nodes in verified trees, accepted, and accepted with no draft proposal for the token
        self.lookup_counts = {"proposed": 0, "accepted": 0, "accepted_lookup_only": 0}
        self.floor_steps = 0  # draft forwards the floor asked for beyond what the costs would
        self.unverified_nodes = 0  # grown nodes within the size bound that did not pay their pass share
        self.prefill_passes = 0  # passes kept out of the pass model (they carried prompt tokens)

    def forget(self) -> None:
        """Back to the priors: calibration and costs unlearned."""
        self.calibration.reset()
        self.lookup_calibration.reset()
        # priors: a 1-row draft forward 50 ms + 2 ms a row; a target pass's compute 1 s + 20 ms a token
        self.draft_cost = LinearCost(0.05, 0.002)  # the draft alone, between passes
        self.pass_draft_cost = LinearCost(0.05, 0.002)  # during a pass's reads (fewer threads)
        self.target_cost = LinearCost(1.0, 0.02)  # compute (with no read waits: the pass)
        self.io_bound_s = None  # length of a pass bound by its reads (moving average); None: none seen
        self.child_mass = 0.8  # calibrated acceptance summed over an expanded node's children (average)
        self.probes = collections.deque(maxlen=self.PROBES)  # prompt passes' compute seconds per row
        self.reset()

    # ---- sizes
    @property
    def tree_tokens(self) -> int:
        if self.fixed_tree_tokens is not None:
            return self.fixed_tree_tokens
        low, high = self.AUTO_TREE_TOKENS
        if self.target_cost.observations < 2:
            if not self.probes:
                return self.INITIAL_TREE_TOKENS
            high = self.INITIAL_TREE_TOKENS  # the prior, with a probed slope
        fixed, per_token = self.target_cost.coefficients()
        if self.io_bound_s is not None:  # tokens whose hidden compute fits in the reads' time
            room = self.io_bound_s / (1.0 - self.unhidden_share) - fixed
        elif self.probes:  # compute-bound at a probed cost a token: none is free, the rule alone sizes it
            return high
        else:  # compute-bound on the prior's shape: what fits in the fixed cost
            room = fixed
        return high if per_token <= 0 else int(min(high, max(low, room / per_token)))

    def pass_seconds(self, tokens: int) -> float:
        """Expected seconds of a target pass over ``tokens`` tree tokens: its compute; while IO-bound,
        the compute its reads cannot hide plus max(the rest, the reads)."""
        compute = self.target_cost(tokens)
        if self.io_bound_s is None:
            return compute
        unhidden = self.unhidden_share * compute
        return unhidden + max(compute - unhidden, self.io_bound_s)

    def verified_tokens(self, values, draft_s: float, pending: int = 0) -> int:
        """How many nodes of a best-first tree to verify (``values``: their path values, root first,
        within the size bound): the head with the most expected tokens (its values and the bonus) per
        second of the round (``draft_s`` of drafting), and never fewer than the root and its confident
        nodes up to the floor's size. Expansion adds a node's top tokens as children whether or not each
        pays its share of the pass; this drops those that don't.

        With ``pending`` prompt tokens in the pass, the round's own rate is low by the prompt's compute,
        so a token is priced at the rate r of the same tree without them: the head maximizes
        gain(n) - r * (draft_s + pass(pending + n)), which with no prompt is the head of rate r itself."""
        if len(values) < 2:  # the root alone (or nothing: no KV room)
            return len(values)
        gains = list(itertools.accumulate(values[1:], initial=1.0))  # gains[n - 1]: head of n nodes
        alone = [draft_s + self.pass_seconds(n) for n in range(1, len(gains) + 1)]  # seconds of the round
        rate = max(g / t for g, t in zip(gains, alone))
        rounds = [draft_s + self.pass_seconds(pending + n) for n in range(1, len(gains) + 1)] if pending else alone
        surplus = [g - rate * t for g, t in zip(gains, rounds)]
        best = 1 + max(range(len(surplus)), key=surplus.__getitem__)
        floor = 1 + sum(1 for v in values[1:self.floor_tree_tokens] if v >= self.CONFIDENT_VALUE)
        best = max(best, min(floor, len(values)))
        self.unverified_nodes += len(values) - best
        return best

    def prefill_apart_pays(self, prompt_tokens: int) -> bool | None:
        """Whether the target should cache a prompt of ``prompt_tokens`` in a pass of its own, beside the
        draft's prefill and first tree, rather than ride along in the first tree's pass: whether
        max(D, P(p)) + P(n) < D + P(p + n), with P the pass model, D the draft's prefill (its forward model
        at p rows; the first tree's steps come on top, so D is a lower bound) and n the tree size. A
        resident target gains min(D, compute(p)) less one pass's fixed cost; a streamed one pays a read
        of every streamed layer more, so only a compute-bound prompt pass gains. None: no pass measured.
        """
        if self.target_cost.observations < 2:
            return None
        p, n = prompt_tokens, self.tree_tokens
        beside = self.draft_cost_during_pass(p)  # on the threads it shares with the prompt's pass
        apart = max(beside, self.pass_seconds(p)) + self.pass_seconds(n)
        return apart < self.draft_cost(p) + self.pass_seconds(p + n)

    @property
    def max_depth(self) -> int:
        return self.fixed_depth if self.fixed_depth is not None else self.max_tree_tokens - 1

    # ---- the paper's rule
    def should_verify(self, tree) -> bool:
        return tree.confidence() < self.alpha

    # ---- the cost rule
    def value(self, parent_value: float, prob: float, lookup=None) -> float:
        """A child's path value: its parent's times the calibrated acceptance of its token: of the draft's
        probability ``prob`` (0 with a lookup key: no draft proposal), of the prompt-lookup key ``lookup``
        (None: none), the better of the two."""
        accept = self.calibration(prob) if prob > 0 or lookup is None else 0.0
        if lookup is not None:
            accept = max(accept, self.lookup_calibration(lookup))
        return parent_value * accept

    def rows(self, values, during_pass: bool = False) -> int:
        """How many of the unexpanded nodes of ``values`` (path values, best first) to expand in the next
        draft forward: the count with the most expected gain per second of draft forward (``during_pass``:
        of one during a pass's reads)."""
        cost = self.draft_cost_during_pass if during_pass else self.draft_cost
        best, best_rate, gain = 0, 0.0, 0.0
        for b, v in enumerate(values[:self.MAX_ROWS], start=1):
            gain += v
            rate = gain / cost(b)
            if rate > best_rate:
                best, best_rate = b, rate
        return best

    def keep_drafting(self, values, floor: float, tree_value: float, tree_tokens: int, draft_s: float,
                      confident_nodes: int | None = None) -> bool:
        """Whether expanding the nodes of ``values`` beats the round so far in tokens per second, or the
        tree is below the floor: fewer than ``floor_tree_tokens - 1`` ``confident_nodes`` (nodes of path
        value at least ``CONFIDENT_VALUE``; None: every node but the root) while the best of ``values``
        is confident too.

        ``floor``: the value a new node must beat to enter a full tree; ``tree_value``: the sum of the
        verified tree's path values (expected accepted draft tokens); ``draft_s``: this round's draft time.
        """
        if self._pays(values, floor, tree_value, tree_tokens, draft_s):
            return True
        confident_nodes = tree_tokens - 1 if confident_nodes is None else confident_nodes
        if confident_nodes < self.floor_tree_tokens - 1 and values and values[0] >= self.CONFIDENT_VALUE:
            self.floor_steps += 1  # never a smaller tree than a chain of the draft's confident tokens
            return True
        return False

    @property
    def floor_tree_tokens(self) -> int:
        return min(self.FLOOR_TREE_TOKENS, self.max_tree_tokens)

    def _pays(self, values, floor: float, tree_value: float, tree_tokens: int, draft_s: float) -> bool:
        children = self.child_mass * sum(values)
        gain = max(0.0, children - floor * len(values)) if floor > 0 else children
        if gain <= 0:
            return False
        now = min(tree_tokens, self.max_tree_tokens)
        grown = min(self.max_tree_tokens, tree_tokens + 2 * len(values))  # about two children a node
        cost = self.draft_cost(len(values)) + self.pass_seconds(grown) - self.pass_seconds(now)
        round_rate = (1.0 + tree_value) / (draft_s + self.pass_seconds(now))
        return gain / cost > round_rate

    def observe_expansion(self, mass: float) -> None:
        """``mass``: calibrated acceptance summed over the top tokens of one expanded node."""
        self.child_mass = 0.9 * self.child_mass + 0.1 * min(1.0, mass)

    def observe_draft(self, rows: int, seconds: float, during_pass: bool = False) -> None:
        (self.pass_draft_cost if during_pass else self.draft_cost).observe(rows, seconds)
        self.sizes["draft_rows"].append(rows)

    def draft_cost_during_pass(self, rows: int) -> float:
        """Seconds of a draft forward of ``rows`` during a pass's reads: measured ones, else the draft
        alone's (the same threads until the engine gives the draft more when it drafts alone)."""
        cost = self.pass_draft_cost if self.pass_draft_cost.observations else self.draft_cost
        return cost(rows)

    def observe_pass(self, tree_tokens: int, seconds: float, pending: int = 0, io_wait_s: float = 0.0,
                     draft_wait_s: float = 0.0) -> None:
        compute = seconds - io_wait_s - draft_wait_s
        if pending:  # a prefill: no typical pass, a probe of a row's compute
            self.prefill_passes += 1
            if tree_tokens:  # the first tree rode in the prompt's pass (0: a prefill of its own)
                self.sizes["verified_tree_tokens"].append(tree_tokens)
            if compute > 0 and math.isfinite(compute):  # a clock step or an odd wait is no probe
                self.probes.append(compute / (tree_tokens + pending))
                self.target_cost.reshape_prior(statistics.median(self.probes))
            return
        self.target_cost.observe(tree_tokens, compute)
        if io_wait_s > self.IO_BOUND_SHARE * seconds:  # the reads and the compute they hide
            self.io_bound_s = ema(self.io_bound_s, seconds - draft_wait_s - self.unhidden_share * compute)
        self.sizes["verified_tree_tokens"].append(tree_tokens)

    def observe(self, tree, accepted) -> None:
        self.calibration.observe_tree(tree, accepted)
        self.lookup_calibration.observe_tree(tree, accepted)
        self._count_lookup(tree, accepted)
        if self.best_first:
            return
        n_correct = len(accepted) - 1
        n_all = best_branch_length(tree, int(accepted[-1]))
        if n_all == 0 or n_correct == n_all:
            self.alpha *= 0.5
        else:
            self.alpha = (n_all - n_correct) / n_all

    def _count_lookup(self, tree, accepted) -> None:
        counts, on_path = self.lookup_counts, {int(a) for a in accepted}
        for node in range(1, len(tree)):
            if tree.lookup[node] is not None:
                counts["proposed"] += 1
                if node in on_path:
                    counts["accepted"] += 1
                    counts["accepted_lookup_only"] += tree.probs[node] <= 0

    def report(self) -> dict:
        """What the rule chose in the last generation and on what measurements (JSON-ready): sizes, the
        fitted pass and draft-forward models (seconds; measurements seen and in the fit's window),
        prefill passes kept out, the floor's extra draft forwards, and the lookup nodes."""
        trees, rows = self.sizes["verified_tree_tokens"], self.sizes["draft_rows"]
        target, draft = self.target_cost.describe(), self.draft_cost.describe()
        return {"alpha_rule": self.alpha_rule, "max_tree_tokens_chosen": self.max_tree_tokens,
                "max_depth_chosen": self.max_depth,
                "mean_tree_tokens": sum(trees) / len(trees) if trees else 0.0,
                "mean_draft_rows": sum(rows) / len(rows) if rows else 0.0,
                "draft_forwards": len(rows),
                "target_pass_model_s": {"fixed": target["fixed"], "per_token": target["per_row"],
                                        "io_bound": self.io_bound_s, "unhidden_share": self.unhidden_share,
                                        "slope_from": target["slope_from"],
                                        "observations": target["observations"],
                                        "window": target["window"],
                                        "prefill_passes_left_out": self.prefill_passes,
                                        "probe_per_token": (statistics.median(self.probes)
                                                            if self.probes else None)},
                "draft_model_s": draft, "draft_during_pass_model_s": self.pass_draft_cost.describe(),
                "floor_tree_tokens": self.floor_tree_tokens, "floor_draft_steps": self.floor_steps,
                "unverified_nodes": self.unverified_nodes,
                "prompt_lookup": self.prompt_lookup,
                **{f"lookup_nodes_{k}": v for k, v in self.lookup_counts.items()}}

    def describe(self) -> dict:
        return {"mode": self.name, "alpha_rule": self.alpha_rule, "max_tree_tokens": self.fixed_tree_tokens,
                "max_depth": self.fixed_depth, "branch_threshold": self.branch_threshold,
                "alpha": self.initial_alpha, "prompt_lookup": self.prompt_lookup}


def best_branch_length(tree, last_accepted: int) -> int:
    """Draft tokens on the branch that matched best: from the root through ``last_accepted``, then down
    first-created (main) children to a leaf."""
    node = last_accepted
    while tree.children[node]:
        node = tree.children[node][0]
    return tree.depth[node]


POLICIES = {"llmcad": LLMCadPolicy, "tree": TreePolicy, "chain": ChainPolicy, "target-only": TargetOnlyPolicy}
OPTIONS = {
    "llmcad": ("max_tree_tokens", "max_depth", "branch_threshold", "alpha", "alpha_rule", "prompt_lookup"),
    "tree": ("max_tree_tokens", "max_depth", "branch_threshold"),
    "chain": ("chain_length",),
    "target-only": (),
}


def make_policy(mode: str, **options) -> Policy:
    """The policy for ``mode``; ValueError for an unknown mode or an option the mode does not take."""
    if mode not in POLICIES:
        raise ValueError(f"mode={mode!r}: expected one of {', '.join(POLICIES)}")
    extra = sorted(set(options) - set(OPTIONS[mode]))
    if extra:
        takes = ", ".join(OPTIONS[mode]) or "no options"
        raise ValueError(f"mode {mode!r} does not take {', '.join(extra)} (it takes {takes})")
    return POLICIES[mode](**options)


def _positive_int(name, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected an int >= {minimum}")
    return value


def _fraction(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 < value <= 1.0:
        raise ValueError(f"{name}={value!r}: expected a number in (0, 1]")
    return float(value)
