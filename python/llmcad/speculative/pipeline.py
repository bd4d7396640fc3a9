"""Compute-IO pipeline: verification on a worker thread, provisional drafting while it waits on IO.

While the streamed target verifies a tree on the ``llmcad-verify`` thread, the main thread keeps
drafting into the same tree: *provisional drafting*. With a best-first policy (the ``llmcad`` cost
rule) each step runs the most valuable candidates in one batched draft forward. The target's bonus
token, the next root, is a token at the node u where the accepted path ends that none of u's verified
children holds: a child of a verified leaf, a node beside the verified tree, or one of the top tokens
an interior node's forward left out (the drafter's ``spare``). Each candidate is weighted by the
probability that it becomes the next root, P(reach u) * P(emit c) (calibrated acceptance, at most what
u's verified children leave: :func:`weigh_unverified`), and nodes under it by their path values; a
verified node's tokens enter the tree only when they run, so what this grows is the next tree under the
likely next roots. Otherwise (chain, tree, the paper's rule) it extends the tree's main path (the
draft's greedy path) one node a step. One :class:`ComputeGate` serialises compute and gives the
target priority: the draft starts a step only while the target is blocked in the streamer's acquire
for a layer whose read has not finished (``StreamedTarget.next_layer_ready()``) and, once typical
durations are known, only when the step (its measured cost for that many rows) should end before the
wait does (moving average of past waits); never while a target layer computes. A target layer that
becomes ready waits at most for the draft step in flight (``stats["gate_wait_s"]`` sums those waits).
With a :class:`~llmcad.speculative.costs.BesideCompute` rule the draft may also step while the target
computes, where the slowdowns measured in a probe pass say a step's value pays for the target compute
it costs (on a CPU whose cores both already serve the target, it never does).
So the IO waits bound provisional drafting; ``max_provisional_tokens`` (None: four trees' worth
best-first, 8 on the main path), the tokens generation may still emit and the draft KV positions the
memory budget reserved (see ``LLMCad``) bound it too.

Reconciliation: best-first (:func:`bonus_subtree`), the subtree under the node the target's bonus
token picks (a child of the last accepted node) becomes the next tree with its draft KV; main path
(:func:`reconcile`), when the accepted path plus the bonus token is a prefix of the main path +
provisional tokens, the provisional tokens beyond it seed the next tree. Everything else is dropped
and the draft cache rolls back to prefix + accepted path. The target's output never depends on
provisional tokens, so output stays lossless either way.

Threads and cores: torch's intra-op pool size is process-wide (``torch.get_num_threads()``, by
default the physical cores) and both threads use it. We keep one size rather than splitting the
cores, because the gate makes draft and target compute one after the other unless the rule measured
that stepping beside each other pays: otherwise at most one intra-op team runs, so the two never
oversubscribe the cores, and each gets all of them when it computes. The streamer's IO threads sleep in reads, not on the cores.

Part of llmcad.speculative: must not import llmcad.streaming, llmcad.models, llmcad.bench or the engine.
"""
from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures

import torch

from llmcad.speculative.costs import ema

DEFAULT_MAX_PROVISIONAL_TOKENS = None  # None: bounded by the IO waits (best-first) or 8 (main path)
MAIN_PATH_PROVISIONAL_TOKENS = 8


class _BusyClock:
    """Seconds one party has computed so far (perf_counter), the stretch in progress included."""

    def __init__(self):
        self.total, self.since = 0.0, None

    def start(self, now: float) -> None:
        if self.since is None:
            self.since = now

    def stop(self, now: float) -> None:
        if self.since is not None:
            self.total, self.since = self.total + now - self.since, None

    def read(self, now: float) -> float:
        return self.total + (now - self.since if self.since is not None else 0.0)


class ComputeGate:
    """One compute lock between the target (verification thread) and the draft (main thread).

    The target holds compute from :meth:`begin_verification` to :meth:`end_verification`, except
    while blocked on IO (:meth:`target_waits_for_io` ... :meth:`target_resumes`). The draft takes a
    step only inside such a wait (:meth:`draft_turn` ... :meth:`draft_step_done`), or, when the
    verification began ``beside`` compute, while the target computes too: "on" all pass, "probe" the
    first half of its ``layers`` streamed layers (:meth:`may_step_beside`). The gate times each streamed
    layer's compute (from its acquire to the next layer's) and files it under ``pass_layers``: "alone"
    (no draft step meanwhile) or "beside" (a draft step during 90% of it or more).

    ``lockstep`` (tests, debugging): every IO wait counts as not-ready and the target resumes only
    once the draft has stopped (:meth:`draft_stops`), so provisional counts are deterministic.
    """

    BESIDE_SHARE = 0.9  # share of a layer (or a step) the other party computed for it to count as beside

    def __init__(self, lockstep: bool = False, layers: int = 0):
        self.lockstep, self.layers = lockstep, layers
        self._cond = threading.Condition()
        self._verifying = False
        self._target_computing = False
        self._io_waiting = False
        self._draft_computing = False
        self._draft_stopped = False
        self.beside = None  # this verification: None, "probe" or "on" (see the class doc)
        self._layer = 0  # streamed layers acquired in this verification
        self._draft_clock, self._target_clock = _BusyClock(), _BusyClock()
        self._layer_start = None  # (perf_counter, draft busy seconds) when the layer computing began
        self._step_start = None  # (perf_counter, target busy seconds) when the draft step in flight began
        self.step_beside = False  # the draft step in flight may run beside the target's compute
        self.pass_layers = {"alone": [], "beside": []}  # this verification's layer compute seconds
        self.target_wait_s = 0.0  # target time spent waiting for a draft step to finish
        self._io_wait_since = 0.0  # when the current IO wait began (perf_counter)
        self._io_waits = 0  # IO waits handed to the draft so far (tells one wait from the next)
        self.io_wait_ema_s = None  # typical IO wait of the target (exponential moving average)
        self.layer_period_ema_s = None  # typical seconds from one streamed layer's acquire to the next's
        self._last_acquire = None  # perf_counter of this verification's last streamed layer acquire
        self.pass_io_wait_s = 0.0  # this verification's IO waits, seconds (the target blocked on reads)
        self.pass_draft_wait_s = 0.0  # this verification's waits for a draft step in flight, seconds
        self.verifications = 0

    # ---- main thread, around one verification ----
    def begin_verification(self, beside: str | None = None) -> None:
        with self._cond:
            self._verifying = self._target_computing = True
            self._io_waiting = self._draft_computing = self._draft_stopped = False
            self.pass_io_wait_s = self.pass_draft_wait_s = 0.0
            self.beside, self._layer, self._layer_start, self._last_acquire = beside, 0, None, None
            self.pass_layers = {"alone": [], "beside": []}
            self._target_clock.start(time.perf_counter())
            self.verifications += 1

    def begin_pass_without_draft(self) -> None:
        """A verification in which the draft takes no step (lockstep must not wait for one)."""
        self.begin_verification()
        self.draft_stops()

    def may_step_beside(self) -> bool:
        """Whether the draft may step while the target computes, now."""
        return self._verifying and (self.beside == "on" or (self.beside == "probe" and self._layer <= self.layers // 2))

    def io_waiting(self) -> bool:
        """Whether the target is blocked on a read now (and has not resumed)."""
        return self._io_waiting

    def draft_turn(self) -> bool:
        """Block until the draft may take one step (True) or the verification has ended (False)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._verifying or self.may_step_beside()
                                or (self._io_waiting and not self._target_computing))
            if not self._verifying:
                return False
            now = time.perf_counter()
            self._draft_computing, self.step_beside = True, False
            self._draft_clock.start(now)
            self._step_start = (now, self._target_clock.read(now))
            return True

    def draft_step_done(self) -> float:
        """The step has ended; returns the share of it during which the target computed."""
        with self._cond:
            now = time.perf_counter()
            t0, busy0 = self._step_start
            self._stop_draft(now)
            return (self._target_clock.read(now) - busy0) / max(now - t0, 1e-9)

    def _stop_draft(self, now: float) -> None:
        self._draft_computing = False
        self._draft_clock.stop(now)
        self._cond.notify_all()

    def step_fits(self, step_s) -> bool:
        """Whether a draft step of ``step_s`` seconds likely ends before the current IO wait does (so
        it does not delay the target); True until both durations have been seen."""
        if self.lockstep or step_s is None or self.io_wait_ema_s is None:
            return True
        return time.perf_counter() - self._io_wait_since + step_s <= self.io_wait_ema_s

    def pass_fits(self, step_s) -> bool:
        """Whether a draft step of ``step_s`` seconds likely ends before this verification does: the
        streamed layers not yet acquired, at their typical period, last at least that long (a step in
        flight when the pass ends delays the acceptance that waits for it). True until a period is known."""
        if self.lockstep or step_s is None or self.layer_period_ema_s is None or not self.layers:
            return True
        return (self.layers - self._layer) * self.layer_period_ema_s >= step_s

    def draft_yield(self) -> None:
        """Give this IO wait back (the awaited layer is ready, or a step would outlast the wait) and
        block until the next wait begins or the verification ends."""
        with self._cond:
            self._stop_draft(time.perf_counter())
            wait = self._io_waits
            self._cond.wait_for(lambda: self._io_waits != wait or not self._verifying)

    def draft_stops(self) -> None:
        """The draft takes no more steps in this verification."""
        with self._cond:
            self._stop_draft(time.perf_counter())
            self._draft_stopped = True

    # ---- verification thread ----
    def end_verification(self) -> None:
        with self._cond:
            self._verifying = self._target_computing = self._io_waiting = False
            self._target_clock.stop(time.perf_counter())
            self._layer_start = None
            self._cond.notify_all()

    def target_waits_for_io(self, ready: bool) -> bool:
        """Before the target acquires a layer: hand compute to the draft unless the layer is ready.
        Returns whether compute was handed over."""
        with self._cond:
            now = time.perf_counter()
            self._file_layer(now)
            if self._last_acquire is not None:
                self.layer_period_ema_s = ema(self.layer_period_ema_s, now - self._last_acquire)
            self._layer, self._last_acquire = self._layer + 1, now
            self._cond.notify_all()  # a probe's half-way mark may have passed
            if ready and not self.lockstep:
                return False
            self._target_computing, self._io_waiting = False, True
            self._target_clock.stop(now)
            self._io_wait_since = now
            self._io_waits += 1
            return True

    def _file_layer(self, now: float) -> None:
        """File the compute of the layer that ends now under ``pass_layers``."""
        if self._layer_start is None:
            return
        t0, busy0 = self._layer_start
        seconds, beside = now - t0, self._draft_clock.read(now) - busy0
        if beside <= 0.0:
            self.pass_layers["alone"].append(seconds)
        elif beside >= self.BESIDE_SHARE * seconds:
            self.pass_layers["beside"].append(seconds)
        self._layer_start = None

    def target_resumes(self) -> None:
        """After the acquire returned: stop new draft steps, wait for the one in flight, take compute
        (unless the draft may step beside compute now)."""
        t0 = time.perf_counter()
        with self._cond:
            if self._io_waiting:
                self.io_wait_ema_s = ema(self.io_wait_ema_s, t0 - self._io_wait_since)
                self.pass_io_wait_s += t0 - self._io_wait_since
            if self.lockstep:
                self._cond.wait_for(lambda: self._draft_stopped)
            self._io_waiting = False
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._draft_computing or (self.step_beside and self.may_step_beside()))
            self._target_computing = True
            now = time.perf_counter()
            self._target_clock.start(now)
            self._layer_start = (now, self._draft_clock.read(now))
        waited = time.perf_counter() - t0
        self.target_wait_s += waited
        self.pass_draft_wait_s += waited


def install_target_hooks(target, streamed=None, gate: ComputeGate | None = None, tracer=None) -> list:
    """Hooks on the target's decoder layers; returns their handles (remove them when done).

    ``streamed``: the :class:`~llmcad.streaming.streamed.StreamedTarget` whose ``model`` is
    ``target`` (None: resident). ``gate``: around each streamed layer's acquire, hand compute to the
    draft while the read is not finished. ``tracer``: one "target" span per layer computed and one
    "io wait" span per acquire that blocked.

    Order per streamed layer (fixed by the streamed target's bind hook, see ``watch_acquire``):
    ``before`` (readiness; gate hands compute over) -> acquire and bind -> ``after`` (gate takes
    compute back, io-wait span, compute span starts) -> the layer -> compute span ends.
    """
    streamed_layers = set(streamed.placement.streamed_layers) if streamed is not None else set()
    handles = []
    for i, layer in enumerate(target.model.layers):
        span = _ComputeSpan(i, tracer, i in streamed_layers) if tracer is not None else None
        if i in streamed_layers and (gate is not None or tracer is not None):
            before, after = _acquire_hooks(i, streamed, gate, tracer, span)
            handles.append(streamed.watch_acquire(before, after))
        elif span is not None:
            handles.append(layer.register_forward_pre_hook(span.start))
        if span is not None:
            handles.append(layer.register_forward_hook(span.end, always_call=True))
    return handles


def _acquire_hooks(i, streamed, gate, tracer, span):
    state = {}

    def before(layer):
        if layer != i:  # a watcher sees every streamed layer's acquire; this one is layer i's
            return
        ready = streamed.next_layer_ready()
        state["t0"], state["ready"] = time.perf_counter(), ready
        if gate is not None:
            gate.target_waits_for_io(ready)

    def after(layer):
        if layer != i:
            return
        t_loaded = time.perf_counter()
        if gate is not None:
            gate.target_resumes()
        if tracer is not None:
            if not state.get("ready", True):
                tracer.add("target", f"io wait L{i}", state["t0"], t_loaded, layer=i)
                if time.perf_counter() - t_loaded > 1e-4:
                    tracer.add("target", "wait draft step", t_loaded, time.perf_counter(), layer=i)
            span.start()

    return before, after


class _ComputeSpan:
    """One "target" span per forward of decoder layer ``i``."""

    def __init__(self, i, tracer, streamed: bool):
        self.i, self.tracer, self.streamed, self.t0 = i, tracer, streamed, None

    def start(self, *_hook_args):
        self.t0 = time.perf_counter()

    def end(self, *_hook_args):
        if self.t0 is not None:
            self.tracer.add("target", f"L{self.i}", self.t0, time.perf_counter(), layer=self.i, streamed=self.streamed)
            self.t0 = None


class VerifyWorker:
    """The verification thread (one per generate call) and provisional drafting beside it."""

    MAX_STRETCH = 10.0  # one odd step (a page fault, a preempted thread) moves step_stretch at most this far

    def __init__(self, verifier, drafter, gate: ComputeGate, layer_ready, tracer=None, abort=None, beside=None):
        self.verifier, self.drafter, self.gate, self.tracer = verifier, drafter, gate, tracer
        self.layer_ready = layer_ready  # () -> bool: the target's awaited layer has been read
        self.abort = abort  # () -> None: makes the verification's layer wait raise (Ctrl-C while drafting)
        self.beside = beside  # llmcad.speculative.costs.BesideCompute: steps beside the target's compute
        self.threaded_passes = 0  # verifications run on the worker (the others ran inline)
        self._io_steps = True  # this verification's IO waits are worth draft steps (_worth_drafting)
        self.step_stretch = 1.0  # provisional steps' seconds over what the draft's cost model predicted (EMA)
        self.steps_cut = 0  # provisional steps not taken because the pass would end first
        self._pool = None

    def __enter__(self) -> "VerifyWorker":
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmcad-verify")
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True)
        self._pool = None

    def verify(self, tree, n: int, max_provisional: int, policy=None, max_depth: int = 0):
        """Verify the first ``n`` nodes of ``tree`` on the worker while drafting up to ``max_provisional``
        provisional nodes into it: best-first expansions (``policy.best_first``, nodes up to depth
        ``max_depth``) or steps down its main path. Returns (logits [n, vocab], provisional node ids);
        an error of the verification is raised here, after the draft has stopped and the worker is idle."""
        tokens, parents = list(tree.tokens[:n]), list(tree.parents[:n])
        beside, self._io_steps = self._beside_mode(policy), self._worth_drafting()
        if max_provisional <= 0 or not (beside or self._io_steps):  # inline: no hand-offs to pay for
            self.gate.begin_pass_without_draft()
            return self._run(tokens, parents), []
        self.threaded_passes += 1
        self.gate.begin_verification(beside)
        try:
            return self._verify_threaded(tree, n, tokens, parents, max_provisional, policy, max_depth)
        finally:
            if beside is not None:
                self.beside.observe_probe(self.gate.pass_layers["alone"], self.gate.pass_layers["beside"],
                                          probe=beside == "probe")

    def _beside_mode(self, policy):
        """How this verification's draft may step beside the target's compute: "probe", "on" or None."""
        if self.beside is None or self.gate.lockstep or policy is None or not policy.best_first:
            return None
        mode = self.beside.mode()
        return mode if mode in ("probe", "on") else None

    def _verify_threaded(self, tree, n, tokens, parents, max_provisional, policy, max_depth):
        future = self._pool.submit(self._run, tokens, parents)
        nodes = []
        try:
            if policy is not None and policy.best_first:
                nodes = self._draft_best_first(tree, n, max_provisional, policy, max_depth)
            else:
                nodes = self._draft(tree, max_provisional)
        except BaseException:
            if self.abort is not None:
                self.abort()  # the verification may be waiting for a slow read: do not wait for it
            raise
        finally:
            self.gate.draft_stops()
            wait_futures([future])  # never leave a pass running (or the gate held) behind us
        return future.result(), nodes

    def _worth_drafting(self) -> bool:
        """Whether the target's IO waits, as measured so far (the gate measures them in every pass,
        threaded or not), are long enough for a draft step: until the first pass, yes."""
        gate = self.gate
        if gate.lockstep or gate.verifications == 0:
            return True
        wait, step = gate.io_wait_ema_s, self.drafter.step_during_pass_s
        return wait is not None and (step is None or wait >= step)

    def _run(self, tokens, parents) -> torch.Tensor:
        try:
            if self.tracer is None:
                return self.verifier.run(tokens, parents)
            with self.tracer.span("verify", "verify", nodes=len(tokens)):
                return self.verifier.run(tokens, parents)
        finally:
            self.gate.end_verification()

    def _draft(self, tree, max_provisional: int) -> list:
        nodes = []
        node = main_path(tree)[-1]
        while len(nodes) < max_provisional and self.gate.draft_turn():
            if self._pass_ends_first(self.drafter.step_during_pass_s):  # a measured step: no stretch
                break
            if not self.gate.lockstep and (self.layer_ready() or not self.gate.step_fits(self.drafter.step_during_pass_s)):
                self.gate.draft_yield()  # the read finished, or will before a step would: target first
                continue
            try:
                node = self.drafter.extend_main(tree, node)
            finally:
                self.gate.draft_step_done()
            nodes.append(node)
        return nodes

    def _draft_best_first(self, tree, n: int, max_provisional: int, policy, max_depth: int) -> list:
        """Grow ``tree`` (its first ``n`` nodes verified) best-first under the likely bonus tokens: each
        step expands the most valuable candidates (:func:`provisional_candidates`) while the expected
        draft forward fits in the IO wait."""
        start, gate = len(tree), self.gate
        weigh_unverified(tree, n, policy)
        while len(tree) - start < max_provisional and gate.draft_turn():
            ranked = provisional_candidates(tree, n, self.drafter.spare, policy, max_depth)
            values = [value for value, _ in ranked]
            rows = ranked[:self.drafter.row_room(policy.rows(values, during_pass=True))]
            if not rows:
                gate.draft_step_done()
                break
            predicted = policy.draft_cost_during_pass(len(rows))
            if self._pass_ends_first(predicted * self.step_stretch):
                break
            beside = self._steps_beside(rows)
            if not gate.lockstep and not beside and (not self._io_steps or not gate.io_waiting() or self.layer_ready()
                                                      or not gate.step_fits(predicted)):
                gate.draft_yield()
                continue
            t0, overlap = time.perf_counter(), 0.0
            try:
                nodes = [grow_candidate(tree, self.drafter.spare, c) for c in rows]
                # a verified node's tokens are candidate roots: they enter the tree when they run (spare)
                bars = [math.inf if node < n else 0.0 for node in nodes]
                self.drafter.expand(tree, nodes, policy, bar=bars, name="provisional", timed=not beside)
            finally:
                overlap = gate.draft_step_done()
            seconds = time.perf_counter() - t0
            self.step_stretch = ema(self.step_stretch, min(seconds / max(predicted, 1e-9), self.MAX_STRETCH))
            if beside and overlap >= gate.BESIDE_SHARE:
                self.beside.observe_step(seconds, predicted)
        return list(range(start, len(tree)))

    def _pass_ends_first(self, step_s) -> bool:
        """Whether the verification would likely end before a draft step of ``step_s`` seconds (the
        acceptance walk would wait for it): then the turn is given back and the step counted as cut."""
        if self.gate.pass_fits(step_s):
            return False
        self.gate.draft_step_done()
        self.steps_cut += 1
        return True

    def _steps_beside(self, rows) -> bool:
        """Whether the next step (``rows``: (path value, candidate)) runs beside the target's compute:
        the gate allows it now and the rule says its rows' mean value pays for it."""
        if self.beside is None or not self.gate.may_step_beside():
            return False
        if self.beside.pays(sum(value for value, _ in rows) / len(rows)):
            self.beside.steps_beside += 1
            self.gate.step_beside = True
            return True
        self.beside.steps_declined += 1
        return False


def acceptance(tree, node: int, policy) -> float:
    """Calibrated probability that the target emits ``node``'s token at its parent."""
    return policy.value(1.0, tree.probs[node], tree.lookup[node])


def stop_mass(tree, node: int, n: int, policy) -> float:
    """Probability that the target, at verified ``node``, emits a token none of its verified children (ids
    below ``n``) holds: 1 less their calibrated acceptances (at least 0)."""
    return max(0.0, 1.0 - sum(acceptance(tree, c, policy) for c in tree.children[node] if c < n))


def weigh_unverified(tree, n: int, policy) -> None:
    """Values of the nodes beyond the verified first ``n`` as the probability that the accepted path of
    this pass and the next reaches them: a child c of a verified node u becomes the next root with
    P(reach u) * P(emit c), that emission at most u's :func:`stop_mass`; below c, calibrated acceptance
    as in any tree. The first ``n`` keep theirs (P(reach)). Parents come before children."""
    stops = {}
    for node in range(n, len(tree)):
        parent = tree.parents[node]
        accept = acceptance(tree, node, policy)
        if parent < n:
            if parent not in stops:
                stops[parent] = stop_mass(tree, parent, n, policy)
            accept = min(accept, stops[parent])
        tree.value[node] = tree.value[parent] * accept


def provisional_candidates(tree, n: int, spare: dict, policy, max_depth: int) -> list:
    """What provisional drafting may expand next, best first, as (value, candidate): unexpanded nodes
    above ``max_depth`` whose parent has run (candidate: the node id), and the ``spare`` top tokens of run
    nodes that are not children yet (candidate: (parent, token, prob)), valued as
    :func:`weigh_unverified` would value them as children: the interior nodes' alternatives, where the
    target's bonus token lands when it rejects every verified child."""
    ranked = [(tree.value[u], u) for u in range(1, len(tree))
              if tree.slot[u] < 0 and tree.depth[u] < max_depth and tree.slot[tree.parents[u]] >= 0]
    for parent, tokens in spare.items():
        if parent >= len(tree) or tree.depth[parent] + 1 >= max_depth or not tokens:
            continue
        stop = stop_mass(tree, parent, n, policy) if parent < n else 1.0
        for token, prob in tokens:
            if tree.child(parent, token) is None:
                ranked.append((tree.value[parent] * min(policy.value(1.0, prob), stop), (parent, token, prob)))
    ranked.sort(key=lambda c: (-c[0], c[1] if isinstance(c[1], int) else len(tree) + c[1][0]))
    return ranked


def grow_candidate(tree, spare: dict, candidate) -> int:
    """The node id of a :func:`provisional_candidates` entry, adding a spare token to the tree as a child
    (and taking it out of ``spare``)."""
    value, key = candidate
    if isinstance(key, int):
        return key
    parent, token, prob = key
    spare[parent] = [(t, p) for t, p in spare[parent] if t != token]
    return tree.add(parent, token, prob, value)


def main_path(tree) -> list:
    """Node ids from the root down first-created (argmax) children to a leaf: the draft's greedy path."""
    path = [0]
    while tree.children[path[-1]]:
        path.append(tree.children[path[-1]][0])
    return path


def bonus_subtree(tree, accepted, bonus: int, max_depth: int) -> list:
    """Node ids that seed the next best-first tree, root first: the subtree under the child of the last
    accepted node whose token is the bonus, when the draft has run that child (else []), without nodes
    more than ``max_depth`` below it."""
    last = int(accepted[-1])
    for child in tree.children[last]:
        if tree.tokens[child] == int(bonus):
            if tree.slot[child] < 0:
                return []
            limit = tree.depth[child] + max(0, max_depth)
            return [u for u in tree.subtree(child) if tree.depth[u] <= limit]
    return []


def reconcile(tree, accepted, bonus: int, provisional: list, max_seed_depth: int) -> list:
    """Node ids that seed the next tree (its root, the bonus token, first), or [] to drop.

    The provisional tokens are kept when the accepted path plus ``bonus`` is a prefix of the main
    path (which ends in the provisional nodes); the seed is the rest of that path from the bonus
    node on, cut to ``max_seed_depth`` nodes below the new root (the next tree's limits).
    """
    if not provisional:
        return []
    path = main_path(tree)
    k = len(accepted)
    if [int(a) for a in accepted] != path[:k] or len(path) <= k or tree.tokens[path[k]] != int(bonus):
        return []
    return path[k:k + 1 + max(0, max_seed_depth)]
