"""Verification policies: when to stop drafting and run the target. One engine, one policy object.

Every policy exposes ``branch_threshold`` (None: no branches), ``max_tree_tokens`` (nodes, root
included), ``max_depth`` (draft tokens on a branch), ``drafts`` (False: the draft is never run),
``should_verify(tree)`` (asked before each draft step; limits are enforced by the drafter) and
``observe(tree, accepted)`` (called after each verification).
"""
from __future__ import annotations

import math


class Policy:
    name = "base"
    drafts = True
    branch_threshold = None
    max_tree_tokens = 1
    max_depth = 0

    def reset(self) -> None:
        """Forget state from a previous generation."""

    def should_verify(self, tree) -> bool:
        return False

    def observe(self, tree, accepted) -> None:
        """Update after a verification (``accepted``: node ids, root first)."""

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
        self.max_tree_tokens = self.chain_length + 1


class TreePolicy(Policy):
    """A fixed-size tree: draft until ``max_tree_tokens`` nodes (or ``max_depth`` everywhere)."""

    name = "tree"

    def __init__(self, max_tree_tokens: int = 32, max_depth: int = 10, branch_threshold: float = 0.3):
        self.max_tree_tokens = _positive_int("max_tree_tokens", max_tree_tokens, minimum=2)
        self.max_depth = _positive_int("max_depth", max_depth)
        self.branch_threshold = _fraction("branch_threshold", branch_threshold)


class LLMCadPolicy(TreePolicy):
    """LLMCad's rule: verify once the tree confidence T_c = max_i C_i drops below ``alpha`` (or a limit).

    After a verification, on the branch that matched best (the one holding the accepted path, followed
    down first-created children): all of it accepted -> ``alpha *= 0.5``; otherwise
    ``alpha = (N_all - N_correct) / N_all`` (the equation of the paper).
    """

    name = "llmcad"

    def __init__(self, max_tree_tokens: int = 32, max_depth: int = 10, branch_threshold: float = 0.3,
                 alpha: float = 0.01):
        super().__init__(max_tree_tokens, max_depth, branch_threshold)
        self.initial_alpha = _fraction("alpha", alpha)
        self.alpha = self.initial_alpha

    def reset(self) -> None:
        self.alpha = self.initial_alpha

    def should_verify(self, tree) -> bool:
        return tree.confidence() < self.alpha

    def observe(self, tree, accepted) -> None:
        n_correct = len(accepted) - 1
        n_all = best_branch_length(tree, int(accepted[-1]))
        if n_all == 0 or n_correct == n_all:
            self.alpha *= 0.5
        else:
            self.alpha = (n_all - n_correct) / n_all

    def describe(self) -> dict:
        return {**super().describe(), "alpha": self.initial_alpha}


def best_branch_length(tree, last_accepted: int) -> int:
    """Draft tokens on the branch that matched best: from the root through ``last_accepted``, then down
    first-created (main) children to a leaf."""
    node = last_accepted
    while tree.children[node]:
        node = tree.children[node][0]
    return tree.depth[node]


POLICIES = {"llmcad": LLMCadPolicy, "tree": TreePolicy, "chain": ChainPolicy, "target-only": TargetOnlyPolicy}
OPTIONS = {
    "llmcad": ("max_tree_tokens", "max_depth", "branch_threshold", "alpha"),
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
