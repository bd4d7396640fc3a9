"""Tree drafting: the draft grows a token tree one draft forward at a time.

The draft keeps ONE KV cache: the committed prefix, then every tree node it has run, in the order it
ran them (``slot``). Extending a node is one forward of that one token, its mask row showing the prefix,
the node's ancestors and itself, at position prefix + depth. After the forward:
- branching: the argmax token becomes the main child; every other token whose probability exceeds
  ``branch_threshold`` opens a branch beside it;
- pacer: with M nodes in the tree, the next leaf to extend is the one with the largest deficit
  ``C_i * M - T_i`` (C_i: product of draft probabilities from the root, T_i: its depth).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from llmcad.spec import kv
from llmcad.spec.forward import forward_with_mask, pending_tree_inputs
from llmcad.spec.pipeline import ema

MAX_CHILDREN = 8  # bound on tokens examined per step (at most 1/threshold can pass anyway)


@dataclass
class DraftTree:
    """A token tree in creation order; node 0 is the root (the last committed token)."""

    tokens: list = field(default_factory=list)
    parents: list = field(default_factory=list)
    probs: list = field(default_factory=list)  # draft probability of each node's token (root: 1)
    cum: list = field(default_factory=list)  # product of probs from the root
    depth: list = field(default_factory=list)
    slot: list = field(default_factory=list)  # index among the draft's forwarded tree nodes, -1 if not run
    children: list = field(default_factory=list)

    @classmethod
    def rooted(cls, root_token: int) -> "DraftTree":
        return cls([int(root_token)], [-1], [1.0], [1.0], [0], [-1], [[]])

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int, prob: float) -> int:
        node = len(self.tokens)
        self.tokens.append(int(token))
        self.parents.append(parent)
        self.probs.append(prob)
        self.cum.append(self.cum[parent] * prob)
        self.depth.append(self.depth[parent] + 1)
        self.slot.append(-1)
        self.children.append([])
        self.children[parent].append(node)
        return node

    def head(self, n: int) -> "DraftTree":
        """A copy of the first ``n`` nodes (e.g. the tree as verified, without provisional nodes)."""
        keep = lambda kids: [c for c in kids if c < n]  # noqa: E731
        return DraftTree(self.tokens[:n], self.parents[:n], self.probs[:n], self.cum[:n], self.depth[:n],
                         self.slot[:n], [keep(k) for k in self.children[:n]])

    def leaves(self) -> list:
        return [i for i, kids in enumerate(self.children) if not kids]

    def confidence(self) -> float:
        """Tree confidence T_c = max over branches (leaves) of their cumulative probability."""
        return max(self.cum[i] for i in self.leaves())

    def ancestors(self, node: int) -> list:
        """Node ids from the root down to ``node``'s parent."""
        chain = []
        while self.parents[node] >= 0:
            node = self.parents[node]
            chain.append(node)
        return chain[::-1]


class TreeDrafter:
    """Grows trees with the draft model and keeps its KV cache in step with the committed text."""

    def __init__(self, draft, prompt_ids):
        from transformers import DynamicCache

        self.draft = draft
        self.cache = DynamicCache()
        self.pending = list(prompt_ids[:-1])  # committed tokens not in the cache yet
        self.steps = 0  # draft forwards, all rounds
        self.tracer = None  # llmcad.trace.Tracer: one "draft" span per forward
        self.step_ema_s = None  # typical one-token draft forward, seconds (moving average; the pipeline)
        self._prefix = 0
        self._ran = 0  # tree nodes run this round
        self._seed = None  # (tree, nodes run) kept from the last round's provisional drafting
        self._branch_threshold = None  # the current policy's (grow sets it)
        self._alternatives = {}  # provisional node -> [(token, prob)] of the branches it would open

    def grow(self, root_token: int, policy, depth_cap: int) -> DraftTree:
        """A tree rooted at ``root_token``, grown until ``policy`` asks for verification or a limit
        (``policy.max_tree_tokens``, ``min(policy.max_depth, depth_cap)``) stops it."""
        tree, ran = self._seed or (DraftTree.rooted(root_token), 0)
        self._seed, self._alternatives = None, {}
        self._branch_threshold = policy.branch_threshold
        if tree.tokens[0] != int(root_token):
            raise ValueError(f"seeded tree's root {tree.tokens[0]} is not the root token {root_token}")
        max_depth = min(policy.max_depth, depth_cap)
        self._prefix = kv.cache_length(self.cache) + len(self.pending) - ran
        self._ran = ran
        while len(tree) < policy.max_tree_tokens and not policy.should_verify(tree):
            node = self._pick_leaf(tree, max_depth)
            if node is None:
                break
            probs = self._run(tree, node)
            self._add_children(tree, node, probs, policy)
        return tree

    def commit(self, tree: DraftTree, accepted, seed=(), max_nodes: int = 0) -> None:
        """Keep prefix + the accepted nodes the draft has run; queue the rest (at most the last) as pending.

        ``seed``: node ids of a chain below the last accepted node (its first node is the next root)
        whose tokens and KV start the next tree (see llmcad.spec.pipeline.reconcile), with the branches
        its provisional steps would have opened, up to ``max_nodes`` nodes; the rest is dropped.
        """
        ran = [tree.slot[a] for a in accepted if tree.slot[a] >= 0]
        seed_ran = [tree.slot[s] for s in seed if tree.slot[s] >= 0]
        keep = list(range(self._prefix)) + [self._prefix + s for s in ran + seed_ran]
        if kv.cache_length(self.cache):
            kv.commit(self.cache, keep)
        self.pending = [tree.tokens[a] for a in accepted if tree.slot[a] < 0]
        if seed:
            if self.pending:
                raise ValueError("a seed needs every accepted node run by the draft")
            self._seed = (self._seed_tree(tree, seed, max(max_nodes, len(seed))), len(seed_ran))

    def _seed_tree(self, tree: DraftTree, seed, max_nodes: int) -> DraftTree:
        """The chain ``seed`` as a new tree rooted at its first node (run nodes get slots 0, 1, ...),
        then the branches beside its main children, shallow first, while fewer than ``max_nodes``."""
        out = DraftTree.rooted(tree.tokens[seed[0]])
        out.slot[0] = 0 if tree.slot[seed[0]] >= 0 else -1
        for node in seed[1:]:
            child = out.add(len(out) - 1, tree.tokens[node], tree.probs[node])
            if tree.slot[node] >= 0:
                out.slot[child] = max(out.slot) + 1
        for i, node in enumerate(seed[:-1]):  # the last seed node has no children in the new tree
            for token, prob in self._alternatives.get(node, ()):
                if len(out) >= max_nodes:
                    return out
                out.add(i, token, prob)
        return out

    def extend_main(self, tree: DraftTree, node: int) -> int:
        """Provisional drafting: run leaf ``node`` and add only its argmax child; returns the child."""
        probs = self._run(tree, node, name="provisional")
        top_p, top_t = torch.topk(probs, k=min(MAX_CHILDREN, probs.numel()))  # as in _add_children
        threshold = self._branch_threshold
        self._alternatives[node] = [(int(t), float(p)) for p, t in zip(top_p[1:].tolist(), top_t[1:].tolist())
                                    if threshold is not None and p > threshold]
        return tree.add(node, int(top_t[0]), float(top_p[0]))

    def _pick_leaf(self, tree: DraftTree, max_depth: int):
        """Pacer: the extensible leaf with the largest deficit C_i * M - T_i (earliest on ties)."""
        m = len(tree)
        best, best_deficit = None, None
        for leaf in tree.leaves():
            if tree.slot[leaf] >= 0 or tree.depth[leaf] >= max_depth:
                continue
            deficit = tree.cum[leaf] * m - tree.depth[leaf]
            if best is None or deficit > best_deficit:
                best, best_deficit = leaf, deficit
        return best

    def _run(self, tree: DraftTree, node: int, name: str = "draft") -> torch.Tensor:
        """One draft forward of ``node``'s token (plus the pending tokens, on a root); its probabilities."""
        t0 = time.perf_counter()
        device = self.draft.get_input_embeddings().weight.device
        dtype = self.draft.get_input_embeddings().weight.dtype
        if node == 0:
            mask, positions = pending_tree_inputs(kv.cache_length(self.cache), len(self.pending), [-1],
                                                  dtype, device)
            inputs = self.pending + [tree.tokens[0]]
            self.pending = []
        else:
            mask, positions = self._node_row(tree, node, dtype, device), [self._prefix + tree.depth[node]]
            inputs = [tree.tokens[node]]
        logits = forward_with_mask(self.draft, self.cache, inputs, positions, mask, logits_to_keep=1)
        tree.slot[node] = self._ran
        self._ran += 1
        self.steps += 1
        if len(inputs) == 1:  # a prompt's prefill is no typical step
            self.step_ema_s = ema(self.step_ema_s, time.perf_counter() - t0)
        if self.tracer is not None:
            self.tracer.add("draft", name, t0, time.perf_counter(), node=node, depth=tree.depth[node])
        return torch.softmax(logits[-1], dim=-1)

    def _node_row(self, tree: DraftTree, node: int, dtype, device) -> torch.Tensor:
        """Mask row [1, 1, 1, prefix + ran + 1]: the prefix, the node's ancestors' slots and its own."""
        keys = self._prefix + self._ran + 1
        row = torch.full((keys,), float("-inf"), dtype=dtype)
        row[: self._prefix] = 0
        visible = [self._prefix + tree.slot[a] for a in tree.ancestors(node)] + [keys - 1]
        row[visible] = 0
        return row.view(1, 1, 1, keys).to(device)

    @staticmethod
    def _add_children(tree: DraftTree, node: int, probs: torch.Tensor, policy) -> None:
        """Main child = argmax; siblings = other tokens above ``policy.branch_threshold``."""
        room = policy.max_tree_tokens - len(tree)
        top_p, top_t = torch.topk(probs, k=min(MAX_CHILDREN, probs.numel()))
        threshold = policy.branch_threshold
        for rank, (p, t) in enumerate(zip(top_p.tolist(), top_t.tolist())):
            if room <= 0 or (rank > 0 and (threshold is None or p <= threshold)):
                break
            tree.add(node, t, p)
            room -= 1
