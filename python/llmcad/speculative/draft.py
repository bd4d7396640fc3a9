"""Tree drafting: the draft grows a token tree, one draft forward per step.

The draft keeps ONE KV cache: the committed prefix, then every tree node it has run, in the order it
ran them (``slot``). A forward runs B nodes as B query rows; row i shows the prefix, the slots of its
node's ancestors and its own new key, at position prefix + depth (:func:`rows_mask`).

Best-first growth (policies with ``best_first``, the ``llmcad`` cost rule): every node carries a
``value``, the calibrated probability that the target accepts its whole path. A step expands the B
most valuable unexpanded nodes together (B and when to stop: the policy's cost model); each gets its
top tokens as children when their value clears the bar (the value of the tree's last place when it is
full). Before verification the tree is reordered best first, and the target verifies its first
``max_tree_tokens`` nodes; the rest (and nodes grown while the target verifies) may seed the next tree.
With ``policy.prompt_lookup``, copies of the text so far (llmcad.speculative.lookup) join the tree
under the root at no draft forward, valued by their own calibration; the draft may expand them later
like any node, and a token it proposes that is already a child merges into that child.

Paced growth (``tree`` and ``chain`` modes, the paper's rule): one node a step.
- branching: the argmax token becomes the main child; every other token whose probability exceeds
  ``branch_threshold`` opens a branch beside it;
- pacer: with M nodes in the tree, the next leaf to extend is the one with the largest deficit
  ``C_i * M - T_i`` (C_i: product of draft probabilities from the root, T_i: its depth).

Part of llmcad.speculative: must not import llmcad.streaming, llmcad.models, llmcad.bench or the engine.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from llmcad.speculative import kv
from llmcad.speculative.forward import forward_with_mask, pending_tree_inputs, prefill
from llmcad.speculative.costs import ema
from llmcad.speculative.lookup import PromptLookup

MAX_CHILDREN = 8  # bound on tokens examined per step (at most 1/threshold can pass anyway)
TOP_CHILDREN = 4  # best-first: tokens examined per expanded node


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
    value: list = field(default_factory=list)  # best-first: calibrated acceptance of the path (root: 1)
    # prompt lookup's key (match length, place along its continuation) of the nodes it proposed, else None;
    # a node only the lookup proposed has draft probability 0
    lookup: list = field(default_factory=list)

    @classmethod
    def rooted(cls, root_token: int) -> "DraftTree":
        return cls([int(root_token)], [-1], [1.0], [1.0], [0], [-1], [[]], [1.0], [None])

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int, prob: float, value: float | None = None, lookup=None) -> int:
        node = len(self.tokens)
        self.lookup.append(lookup)
        self.value.append(self.cum[parent] * prob if value is None else value)
        self.tokens.append(int(token))
        self.parents.append(parent)
        self.probs.append(prob)
        self.cum.append(self.cum[parent] * prob)
        self.depth.append(self.depth[parent] + 1)
        self.slot.append(-1)
        self.children.append([])
        self.children[parent].append(node)
        return node

    def child(self, node: int, token: int):
        """The child of ``node`` whose token is ``token`` (None: no such child)."""
        return next((c for c in self.children[node] if self.tokens[c] == int(token)), None)

    def head(self, n: int) -> "DraftTree":
        """A copy of the first ``n`` nodes (e.g. the tree as verified, without provisional nodes)."""
        keep = lambda kids: [c for c in kids if c < n]  # noqa: E731
        return DraftTree(self.tokens[:n], self.parents[:n], self.probs[:n], self.cum[:n], self.depth[:n],
                         self.slot[:n], [keep(k) for k in self.children[:n]], self.value[:n], self.lookup[:n])

    def select(self, nodes) -> "DraftTree":
        """The nodes ``nodes`` (root first, every node after its parent) as a tree of their own,
        rooted at ``nodes[0]``; slots and probabilities are kept, values and depths re-rooted."""
        index = {node: i for i, node in enumerate(nodes)}
        root = nodes[0]
        out = DraftTree.rooted(self.tokens[root])
        out.slot[0] = self.slot[root]
        for node in nodes[1:]:
            child = out.add(index[self.parents[node]], self.tokens[node], self.probs[node],
                            self.value[node] / self.value[root] if self.value[root] > 0 else 0.0,
                            self.lookup[node])
            out.slot[child] = self.slot[node]
        return out

    def best_first_order(self, max_depth: int) -> list:
        """Node ids by value (ties: creation order), nodes deeper than ``max_depth`` left out. Values
        never grow down a path, so every node comes after its parent."""
        keep = [i for i in range(len(self)) if self.depth[i] <= max_depth]
        return sorted(keep, key=lambda i: (-self.value[i], i))

    def subtree(self, node: int) -> list:
        """``node`` and its descendants, in creation order."""
        inside = {node}
        for i in range(node + 1, len(self)):
            if self.parents[i] in inside:
                inside.add(i)
        return sorted(inside)

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

    def __init__(self, draft, prompt_ids, max_pass_rows: int | None = None, chunk_rows: int | None = None,
                 cache=None, vocab_ids=None):
        """``max_pass_rows``: rows of the largest forward (a longer prompt is cached in passes of its own;
        None: no bound); ``chunk_rows``: logits rows made at once (only each row's top tokens are kept);
        ``cache``: a DynamicCache already holding the prompt's first tokens (fewer than all);
        ``vocab_ids``: int64 [N], the token id of each row of the draft's output layer when it holds only
        N of the vocabulary's rows (None: row i is token i). The draft then proposes only those tokens,
        with their probabilities renormalised over them."""
        from transformers import DynamicCache

        self.draft = draft
        self.vocab_ids = None if vocab_ids is None else vocab_ids.to(self._device_dtype()[0])
        self.max_pass_rows, self.chunk_rows = max_pass_rows, chunk_rows
        self.cache = DynamicCache() if cache is None else cache
        self._prefix = kv.cache_length(self.cache)
        self.pending = list(prompt_ids[self._prefix:-1])  # committed tokens not in the cache yet
        self.history = PromptLookup(prompt_ids[:-1])  # committed tokens before the root (prompt lookup)
        self.steps = 0  # draft forwards, all rounds
        self.tracer = None  # llmcad.trace.Tracer: one "draft" span per forward
        self.step_ema_s = None  # typical one-token draft forward, seconds (moving average; the pipeline)
        self.pass_step_ema_s = None  # the same, of provisional forwards during a pass's reads
        self._ran = 0  # tree nodes run this round
        self._seed = None  # (tree, nodes run) kept from the last round's provisional drafting
        self._branch_threshold = None  # the current policy's (grow sets it)
        self._alternatives = {}  # provisional node -> [(token, prob)] of the branches it would open
        # best-first: run node -> [(token, prob)] of its top tokens that did not become children (the
        # pipeline grows them while the target reads: the target's bonus token may be one of them)
        self.spare = {}
        self._kv_room = 1 << 30  # draft KV positions this round may still add beyond pending (grow sets it)

    @property
    def step_during_pass_s(self):
        """A typical draft forward during a pass's reads (its threads may be fewer than the draft alone's):
        measured ones, else any (None before the first)."""
        return self.pass_step_ema_s if self.pass_step_ema_s is not None else self.step_ema_s

    @property
    def committed_length(self) -> int:
        """Leading cache positions that hold committed tokens (the prefix of the last tree)."""
        return min(kv.cache_length(self.cache), self._prefix)

    def grow(self, root_token: int, policy, depth_cap: int, kv_room: int | None = None) -> DraftTree:
        """A tree rooted at ``root_token``, grown until ``policy`` asks for verification or a limit
        (``policy.max_tree_tokens``, ``min(policy.max_depth, depth_cap)``, ``kv_room``) stops it.
        ``kv_room``: draft KV positions left beyond the pending tokens (which ride in with the root);
        when it is under 1 the root does not run and the tree is the root alone. Best-first trees come
        back best first: verify their first ``policy.max_tree_tokens`` nodes."""
        tree, ran = self._seed or (DraftTree.rooted(root_token), 0)
        if self._seed is None:
            self.spare = {}
        self._seed, self._alternatives = None, {}
        self._branch_threshold = policy.branch_threshold
        if tree.tokens[0] != int(root_token):
            raise ValueError(f"seeded tree's root {tree.tokens[0]} is not the root token {root_token}")
        max_depth = min(policy.max_depth, depth_cap)
        self._prefix = kv.cache_length(self.cache) + len(self.pending) - ran
        self._ran = ran
        self._kv_room = (1 << 30) if kv_room is None else kv_room
        if policy.best_first:
            return self._grow_best_first(tree, policy, max_depth)
        while len(tree) < policy.max_tree_tokens and self._kv_room >= 1 and not policy.should_verify(tree):
            node = self._pick_leaf(tree, max_depth)
            if node is None:
                break
            self._add_children(tree, node, self._run(tree, node), policy)
        return tree

    def _grow_best_first(self, tree: DraftTree, policy, max_depth: int) -> DraftTree:
        """Batched best-first growth until the policy's cost model says verify (see module doc)."""
        t0 = time.perf_counter()
        self._revalue(tree, policy)
        if tree.slot[0] < 0 and max_depth > 0 and self._kv_room >= 1:
            typical = not self.pending  # a prompt's prefill is no typical step
            top = self._run(tree, 0)
            if typical:
                policy.observe_draft(1, time.perf_counter() - t0)
            self.spare[0] = self._add_best_children(tree, 0, top, policy, bar=0.0)
        if getattr(policy, "prompt_lookup", False):
            self._add_lookup(tree, policy, max_depth)
        while True:
            limit = policy.max_tree_tokens
            ranked = sorted(tree.value, reverse=True)
            floor = ranked[limit - 1] if len(tree) >= limit else 0.0
            values, nodes = self._frontier(tree, max_depth)
            rows = min(policy.rows(values), self._kv_room, self.max_pass_rows or len(nodes))
            confident = sum(1 for v in ranked[1:limit] if v >= policy.CONFIDENT_VALUE)
            if rows <= 0 or not policy.keep_drafting(values[:rows], floor, sum(ranked[1:limit]), len(tree),
                                                     time.perf_counter() - t0, confident):
                break
            self.expand(tree, nodes[:rows], policy, bar=floor)
        order = tree.best_first_order(max_depth)
        self._renumber_spare(order)
        return tree.select(order)

    def _renumber_spare(self, nodes) -> None:
        """``spare`` for the tree ``select(nodes)``: keyed by the nodes' new ids."""
        self.spare = {i: self.spare[u] for i, u in enumerate(nodes) if u in self.spare}

    def row_room(self, rows: int) -> int:
        """``rows`` within the draft KV room and the largest forward."""
        return max(0, min(rows, self._kv_room, self.max_pass_rows or rows))

    def _add_lookup(self, tree: DraftTree, policy, max_depth: int) -> None:
        """Prompt-lookup continuations of the text so far and the root join the tree as branches under
        the root, at no draft forward; a token already a child merges into it. Values: see
        :meth:`_revalue`."""
        for n, continuation in self.history.propose([tree.tokens[0]]):
            node = 0
            for place, token in enumerate(continuation[:max_depth], start=1):
                child = tree.child(node, token)
                if child is None:
                    child = tree.add(node, token, 0.0, 0.0, lookup=(n, place))
                elif tree.lookup[child] is None:
                    tree.lookup[child] = (n, place)
                node = child
        self._revalue(tree, policy)

    def expand(self, tree: DraftTree, nodes, policy, bar=0.0, name: str = "draft", timed: bool = True) -> None:
        """One draft forward of ``nodes`` (unexpanded, not the root); their top tokens become children
        (``bar``: see :meth:`_add_best_children`; a list: one per node). ``timed``: the forward's time
        joins the policy's draft cost model (not for a forward beside the target's compute)."""
        top_p, top_t = self._run_rows(tree, nodes, policy if timed else None, name)
        bars = bar if isinstance(bar, (list, tuple)) else [bar] * len(nodes)
        for row, node in enumerate(nodes):
            self.spare[node] = self._add_best_children(tree, node, (top_p[row], top_t[row]), policy, bars[row])

    def best_frontier(self, tree: DraftTree, policy, max_depth: int) -> list:
        """The unexpanded nodes the policy would expand next, within the KV room."""
        values, nodes = self._frontier(tree, max_depth)
        return nodes[:self.row_room(policy.rows(values))]

    @staticmethod
    def _frontier(tree: DraftTree, max_depth: int) -> tuple[list, list]:
        """(values, node ids) of the unexpanded nodes above ``max_depth`` whose parent the draft has run
        (a lookup branch's deeper nodes wait for the nodes above them), best first."""
        nodes = [i for i in range(1, len(tree)) if tree.slot[i] < 0 and tree.depth[i] < max_depth
                 and tree.slot[tree.parents[i]] >= 0]
        nodes.sort(key=lambda i: (-tree.value[i], i))
        return [tree.value[i] for i in nodes], nodes

    @staticmethod
    def _revalue(tree: DraftTree, policy) -> None:
        """Path values from the current calibrations (a seeded tree's came from the previous one)."""
        tree.value[0] = 1.0
        for node in range(1, len(tree)):
            tree.value[node] = policy.value(tree.value[tree.parents[node]], tree.probs[node], tree.lookup[node])

    @staticmethod
    def _add_best_children(tree: DraftTree, node: int, top, policy, bar: float) -> list:
        """Children: the top tokens (``top``: probabilities and tokens, best first) whose value clears
        ``bar`` (with ``policy.branch_threshold``: the argmax and tokens above it). A token already a child
        (a lookup branch) merges into it: it gets the draft's probability, and the better value.
        Returns the other top tokens, [(token, prob)], best first."""
        threshold, mass, spare, stopped = policy.branch_threshold, 0.0, [], False
        for rank, (p, t) in enumerate(zip(top[0].tolist(), top[1].tolist())):
            child = tree.child(node, t)
            if rank < TOP_CHILDREN and not stopped:
                accept = policy.calibration(p)
                mass += accept
                value = tree.value[node] * accept
                stopped = threshold is not None and rank > 0 and p <= threshold
                if not stopped and child is not None:
                    tree.probs[child], tree.cum[child] = p, tree.cum[node] * p
                    tree.value[child] = max(tree.value[child], value)
                    continue
                if not stopped and value > bar:
                    tree.add(node, t, p, value)
                    continue
            if child is None and p > 0:
                spare.append((int(t), float(p)))
        policy.observe_expansion(mass)
        return spare

    def commit(self, tree: DraftTree, accepted, seed=(), max_nodes: int = 0) -> None:
        """Keep prefix + the accepted nodes the draft has run; queue the rest as pending (after the
        pending tokens still uncached when the root did not run, out of KV room).

        ``seed``: node ids of a subtree below the last accepted node, root first, every node after its
        parent (its root is the next tree's root; see llmcad.speculative.pipeline) whose tokens and KV start the
        next tree, with the branches provisional main-path steps would have opened, up to ``max_nodes``.
        """
        self.history.extend(tree.tokens[a] for a in accepted)
        ran = [tree.slot[a] for a in accepted if tree.slot[a] >= 0]
        seed_ran = sorted(tree.slot[s] for s in seed if tree.slot[s] >= 0)
        cached = self._prefix - len(self.pending)  # committed positions in the cache (pending: root not run)
        keep = list(range(cached)) + [self._prefix + s for s in ran + seed_ran]
        if kv.cache_length(self.cache):
            kv.commit(self.cache, keep)
        self.pending = self.pending + [tree.tokens[a] for a in accepted if tree.slot[a] < 0]
        if seed:
            if self.pending:
                raise ValueError("a seed needs every accepted node run by the draft")
            self._seed = (self._seed_tree(tree, list(seed), max(max_nodes, len(seed))), len(seed_ran))
            self._renumber_spare(list(seed))

    def _seed_tree(self, tree: DraftTree, seed: list, max_nodes: int) -> DraftTree:
        """The subtree ``seed`` as a new tree (its run nodes get slots 0, 1, ... in the order they ran),
        then the branches beside a seeded chain's main children, shallow first, while fewer than
        ``max_nodes``."""
        out = tree.select(seed)
        ranks = {slot: i for i, slot in enumerate(sorted(s for s in out.slot if s >= 0))}
        out.slot = [ranks[s] if s >= 0 else -1 for s in out.slot]
        for i, node in enumerate(seed[:-1]):  # the last seed node has no children in the new tree
            for token, prob in self._alternatives.get(node, ()):
                if len(out) >= max_nodes:
                    return out
                out.add(i, token, prob)
        return out

    def extend_main(self, tree: DraftTree, node: int) -> int:
        """Provisional drafting: run leaf ``node`` and add only its argmax child; returns the child."""
        top_p, top_t = self._run(tree, node, name="provisional")
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

    def _run(self, tree: DraftTree, node: int, name: str = "draft"):
        """One draft forward of ``node``'s token (plus the pending tokens, on a root); its top
        probabilities and tokens (:meth:`_top`), [MAX_CHILDREN] each."""
        t0 = time.perf_counter()
        if node == 0:
            self._prefill_long_pending()
            device, dtype = self._device_dtype()
            mask, positions = pending_tree_inputs(kv.cache_length(self.cache), len(self.pending), [-1],
                                                  dtype, device)
            inputs = self.pending + [tree.tokens[0]]
            logits = forward_with_mask(self.draft, self.cache, inputs, positions, mask, logits_to_keep=1)
            top_p, top_t = self._top(logits)
            self._kv_room -= 1  # the pending tokens were counted outside the room
            self.pending = []
            tree.slot[0] = self._ran
            self._ran += 1
            self.steps += 1
            if len(inputs) == 1:  # a prompt's prefill is no typical step
                self.step_ema_s = ema(self.step_ema_s, time.perf_counter() - t0)
            if self.tracer is not None:
                self.tracer.add("draft", name, t0, time.perf_counter(), node=0, depth=0)
            return top_p[-1], top_t[-1]
        top_p, top_t = self._run_rows(tree, [node], None, name)
        return top_p[0], top_t[0]

    def _prefill_long_pending(self) -> None:
        """Cache the pending tokens beyond what one forward of ``max_pass_rows`` holds beside the root."""
        rows = self.max_pass_rows
        if rows is not None and len(self.pending) + 1 > rows:
            split = len(self.pending) + 1 - rows
            prefill(self.draft, self.cache, self.pending[:split], rows)
            self._kv_room -= split
            self.pending = self.pending[split:]

    def _top(self, logits):
        """Each row's MAX_CHILDREN most probable tokens: (probabilities, tokens) [rows, k], made from the
        logits a chunk of rows at a time (a softmax over the output layer's rows, then top-k; row ids
        mapped to token ids through ``vocab_ids``)."""
        k = min(MAX_CHILDREN, logits.shape[1])
        tops = [torch.topk(torch.softmax(rows, dim=-1), k=k) for _, rows in logits.chunks()]
        rows = torch.cat([t.indices for t in tops])
        return torch.cat([t.values for t in tops]), rows if self.vocab_ids is None else self.vocab_ids[rows]

    def _run_rows(self, tree: DraftTree, nodes, policy, name: str = "draft"):
        """One draft forward of the tokens of ``nodes`` (none the root) as rows: their top probabilities
        and tokens (:meth:`_top`), [B, MAX_CHILDREN] each."""
        t0 = time.perf_counter()
        device, dtype = self._device_dtype()
        mask = rows_mask(tree.parents, tree.slot, nodes, self._prefix, self._ran, dtype).to(device)
        positions = [self._prefix + tree.depth[u] for u in nodes]
        logits = forward_with_mask(self.draft, self.cache, [tree.tokens[u] for u in nodes], positions, mask,
                                   chunk_rows=self.chunk_rows)
        top = self._top(logits)
        for row, node in enumerate(nodes):
            tree.slot[node] = self._ran + row
        self._ran += len(nodes)
        self._kv_room -= len(nodes)
        self.steps += 1
        seconds, during_pass = time.perf_counter() - t0, name == "provisional"
        self.step_ema_s = ema(self.step_ema_s, seconds)
        if during_pass:
            self.pass_step_ema_s = ema(self.pass_step_ema_s, seconds)
        if policy is not None:
            policy.observe_draft(len(nodes), seconds, during_pass)
        if self.tracer is not None:
            self.tracer.add("draft", name, t0, time.perf_counter(), rows=len(nodes),
                            depth=max(tree.depth[u] for u in nodes))
        return top

    def _device_dtype(self):
        weight = self.draft.get_input_embeddings().weight
        return weight.device, weight.dtype

    @staticmethod
    def _add_children(tree: DraftTree, node: int, top, policy) -> None:
        """Main child = argmax; siblings = other tokens above ``policy.branch_threshold`` (``top``: the
        node's top probabilities and tokens, best first)."""
        room = policy.max_tree_tokens - len(tree)
        top_p, top_t = top
        threshold = policy.branch_threshold
        for rank, (p, t) in enumerate(zip(top_p.tolist(), top_t.tolist())):
            if room <= 0 or (rank > 0 and (threshold is None or p <= threshold)):
                break
            tree.add(node, t, p)
            room -= 1


def rows_mask(parents, slots, nodes, prefix: int, ran: int, dtype=torch.float32) -> torch.Tensor:
    """Additive mask [1, 1, B, prefix + ran + B] of a draft forward running ``nodes`` as B rows after
    ``prefix`` committed keys and ``ran`` tree keys (key ``prefix + slots[u]`` holds node u).

    Row i sees every prefix key, the keys of node i's ancestors and its own new key ``prefix + ran + i``;
    0 where visible, -inf elsewhere (float, never bool: bool masks are silently wrong in eager attention).
    ValueError when a node was run already or an ancestor was not.
    """
    keys = prefix + ran + len(nodes)
    mask = torch.full((len(nodes), keys), float("-inf"), dtype=dtype)
    mask[:, :prefix] = 0
    for row, node in enumerate(nodes):
        if slots[node] >= 0:
            raise ValueError(f"node {node} has run already (slot {slots[node]})")
        visible, a = [prefix + ran + row], parents[node]
        while a >= 0:
            if not 0 <= slots[a] < ran:
                raise ValueError(f"ancestor {a} of node {node} has not run (slot {slots[a]})")
            visible.append(prefix + slots[a])
            a = parents[a]
        mask[row, visible] = 0
    return mask.view(1, 1, len(nodes), keys)
