"""The LLMCad engine: draft a tree, verify it in one target pass (on a worker thread while the draft
drafts provisionally, when pipelined), commit the accepted path, repeat."""
from __future__ import annotations

import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from llmcad import memory
from llmcad.cores import CpuLoad, check_threads, compute_threads, set_threads, usable_cores
from llmcad.speculative import kv
from llmcad.speculative.draft import DraftTree, TreeDrafter
from llmcad.errors import BudgetError, EngineBusyError, EngineClosedError, OutputError, PromptError
from llmcad.speculative.costs import BesideCompute
from llmcad.speculative.policy import POLICIES, Policy, make_policy
from llmcad.models.fetch import resolve_pair
from llmcad.speculative.prefix_cache import PrefixCache
from llmcad.models.chat import chat_prompt_ids, is_messages
from llmcad.models.draft_head import parse_draft_head
from llmcad.models.loading import load_pair, output_rows, resolve_device, resolve_dtype
from llmcad.models.vocab import parse_draft_vocab
from llmcad.speculative.pipeline import (DEFAULT_MAX_PROVISIONAL_TOKENS, MAIN_PATH_PROVISIONAL_TOKENS, ComputeGate,
                                  VerifyWorker, bonus_subtree, install_target_hooks, main_path, reconcile)
from llmcad.stats import StatsRecorder
from llmcad.streaming.budget import logits_chunk_rows, module_bytes
from llmcad.trace import Tracer, io_lane
from llmcad.speculative.verify import TargetChooser, TargetVerifier, choose_and_accept, validate_sampling

# prompt tokens below which a prefill of their own costs more (a pass's fixed cost) than it hides
PREFILL_BESIDE_MIN_TOKENS = 32


@dataclass
class GenerationResult:
    """``tokens``: generated ids (EOS included when reached, like transformers); ``text``: their decoding
    without special tokens; ``stats``: counters and timings (JSON-ready); ``trace``: one dict per pass."""

    tokens: list
    text: str
    stats: dict
    trace: list = field(default_factory=list)


class LLMCad:
    """A draft/target pair, a verification policy and the compute-IO pipeline switches.

    ``target`` is any transformers causal LM: it is only ever called through its ordinary forward
    with a float 4D mask, explicit positions and a DynamicCache. ``streamed``: the
    :class:`~llmcad.streaming.streamed.StreamedTarget` whose ``model`` is ``target`` when its layers
    are streamed (None: resident); ``placement`` defaults to its placement.

    ``pipeline``: verify on a worker thread while the draft drafts provisionally during the target's
    IO waits (llmcad.speculative.pipeline); None = on in mode "llmcad" only. It needs a streamed target (nothing
    waits on IO otherwise) and a drafting mode. ``prefetch``: read the next pass's first layers while
    the draft drafts (False: a pass's reads start when it begins). ``max_provisional_tokens``: bound
    on provisional tokens per verification (0: none). ``draft_beside_compute`` (attribute, default True):
    the pipelined cost rule may let the draft step while the target computes too, where its measured
    slowdowns say it pays (llmcad.speculative.costs.BesideCompute; False: only during IO waits).
    ``prefill_beside`` (attribute): the target caches a long prompt on a thread of its own while the draft
    prefills it and drafts the first tree, and the first pass holds the tree alone; None (the default):
    where a CPU core is left free by torch's threads and, for the cost rule, where its pass model says
    the pass of its own pays (a streamed target's reads every streamed layer once more: only a
    compute-bound prompt gains); True/False: always/never.

    ``prefix_cache``: keep the draft's and the target's KV of earlier generations (prompt and answer)
    and start a prompt that shares a prefix with one of them from there, prefilling only the rest
    (llmcad.speculative.prefix_cache); within the memory budget's KV positions. False: every generate
    starts from scratch.

    ``draft_vocab_ids``: the sorted token ids of the draft's output rows when its output layer holds only
    those (llmcad.models.vocab, ``from_pretrained(draft_vocab=N)``); None: the full vocabulary.
    """

    modes = tuple(POLICIES)

    def __init__(self, draft, target, tokenizer, policy: Policy, *, streamed=None, placement=None, pipeline=None,
                 prefetch=True, max_provisional_tokens=DEFAULT_MAX_PROVISIONAL_TOKENS, prefix_cache=True,
                 runtime_floor=None, budget_source=None, draft_vocab_ids=None):
        _check_prefix_cache(prefix_cache)
        _check_vocab_ids(draft, draft_vocab_ids)
        if streamed is not None and streamed.model is not target:
            raise ValueError("streamed.model must be the target model")
        self.draft = draft
        self.draft_vocab_ids = draft_vocab_ids
        self.target = target
        self.streamed = streamed
        self.tokenizer = tokenizer
        self.policy = policy
        self.placement = placement if placement is not None or streamed is None else streamed.placement
        self.pipeline, self.prefetch, self.max_provisional_tokens = _pipeline_options(
            policy, pipeline, prefetch, max_provisional_tokens)
        self.pipeline_lockstep = False  # tests: deterministic provisional counts (see ComputeGate)
        self.draft_beside_compute = True
        self.prefill_beside = None
        self.beside_rule = BesideCompute()  # measured across generations (the machine's, not the text's)
        self.cpu_threads = set_threads(None, None)  # from_pretrained: what its ``threads`` chose, on what load
        self.eos_token_ids = _eos_ids(target)
        self._draft_kv_positions = _budgeted_kv_positions(draft, target, self.placement)
        self.prefix_cache = PrefixCache(self._draft_kv_positions, position_bytes=_kv_position_bytes(draft, target)) \
            if prefix_cache else None
        # the memory budget's largest pass: trees and prompt passes stay within it; logits come in chunks
        self.pass_rows = getattr(self.placement, "pass_rows", None)
        policy.memory_cap = self.pass_rows
        policy.unhidden_share = unhidden_compute_share(streamed)
        self.chunk_rows = {name: min(logits_chunk_rows(m.config, m.dtype), self.pass_rows or 1 << 30)
                           for name, m in (("target", target), ("draft", draft))}
        self.runtime_floor = memory.runtime_floor() if runtime_floor is None else runtime_floor
        self.budget_source = budget_source
        self._closed = False
        self._generating = threading.Lock()  # one generate at a time; others wait their turn
        self._generating_thread = None  # ident of the thread inside generate (streamer callbacks run there)
        # an engine dropped without close() still releases the streamed target's files, buffers, threads
        self._finalizer = weakref.finalize(self, _release_streamed, streamed)

    @classmethod
    def from_pretrained(cls, draft=None, target=None, *, mode="llmcad", memory_budget=None, device="cpu", dtype=None,
                        pipeline=None, prefetch=True, max_provisional_tokens=DEFAULT_MAX_PROVISIONAL_TOKENS,
                        streamer_options=None, mmap=False, trust_remote_code=False, prefix_cache=True,
                        draft_vocab=None, draft_head="auto", threads="auto", draft_threads="auto",
                        **policy_options) -> "LLMCad":
        """Load a draft/target pair: local HF directories, names ``llmcad models`` lists, or hub ids;
        with neither, the demo pair (fetched and prepared on first use; its draft packed as int4 unless
        ``dtype`` is float32).

        ``mode``: "llmcad" (tree + LLMCad fallback + pipeline), "tree" (fixed-size tree), "chain"
        (fixed-length chain) or "target-only" (one token a pass). ``policy_options``: that mode's
        parameters (max_tree_tokens, max_depth, branch_threshold, alpha, chain_length; see
        llmcad.speculative.policy). ``pipeline``, ``prefetch``, ``max_provisional_tokens``: see :class:`LLMCad`.
        ``memory_budget``: None keeps the target resident; a size ("2.5GiB", bytes) or "auto" (the memory
        cgroup's limit, else MemAvailable, less a margin) bounds the peak resident memory of the whole
        process, runtime included (llmcad.streaming.budget). ``dtype``: None keeps the checkpoint's.
        ``streamer_options``: WeightStreamer keyword arguments for a streamed target (e.g.
        ``{"bandwidth_cap": 300e6}`` bytes/s, ``backend``, ``direct``). ``mmap``: map the draft's and a
        resident target's weight files instead of reading them into memory the engine owns: faster to
        load, but truncating a mapped file kills the process (SIGBUS) and editing it changes the outputs.
        ``trust_remote_code``: run Python code a model directory ships (``auto_map``); without it (the
        default) such a model is refused, never run and never asked about on stdin.
        ``prefix_cache``: see :class:`LLMCad`. ``draft_vocab``: N restricts the draft's output layer to
        the N most frequent tokens of a calibration corpus (llmcad.models.vocab): a cheaper draft
        forward, the same output; None or 0: the full vocabulary. ``draft_head``: how the draft's output
        layer is held (llmcad.models.draft_head): "auto" (the default: packed like the draft's decoder
        linears on a CPU, so an int8 draft gets an int8 head; float otherwise), "float", "int8" or "int4";
        a cheaper draft forward, the same output. ``threads``: torch's compute threads
        (process-wide): an int; "auto" (the default) measures the load other processes put on the cores
        while the models load and leaves fewer threads than torch's default where they keep cores busy
        (llmcad.cores), unless OMP_NUM_THREADS is set; None leaves torch's count as it is. They run the
        target's passes and the draft's steps beside them. ``draft_threads``: the draft's threads when it
        drafts alone, between passes with none in flight: an int, or "auto" (the default): every usable
        core other processes leave free, at least ``threads`` (OMP_NUM_THREADS or ``threads=None`` fix it).
        """
        policy = make_policy(mode, **policy_options)  # fail on a bad option before loading anything
        parse_draft_vocab(draft_vocab)
        parse_draft_head(draft_head)
        draft, target = resolve_pair(draft, target, dtype)
        _pipeline_options(policy, pipeline, prefetch, max_provisional_tokens)
        _check_prefix_cache(prefix_cache)
        resolve_device(device)
        resolve_dtype(dtype)
        check_threads(threads)
        check_threads(draft_threads, "draft_threads", none=False)
        if streamer_options and memory_budget is None:
            raise ValueError("streamer_options need a memory_budget (without one the target is resident)")
        if streamer_options:
            from llmcad.streaming.streamer import check_bandwidth_cap

            check_bandwidth_cap(streamer_options.get("bandwidth_cap"))  # before loading anything
        extra = {"streamer_options": dict(streamer_options)} if streamer_options else {}
        load = CpuLoad() if str(device).startswith("cpu") else None
        pair = load_pair(draft, target, device=device, dtype=dtype, memory_budget=memory_budget, mmap=mmap,
                         trust_remote_code=trust_remote_code, draft_vocab=draft_vocab, draft_head=draft_head,
                         **extra)
        engine = cls(pair.draft, pair.target, pair.tokenizer, policy, streamed=pair.streamed,
                     placement=pair.placement, pipeline=pipeline, prefetch=prefetch,
                     max_provisional_tokens=max_provisional_tokens, prefix_cache=prefix_cache,
                     runtime_floor=pair.runtime_floor, budget_source=pair.budget_source,
                     draft_vocab_ids=pair.draft_vocab)
        engine.cpu_threads = set_threads(threads, load, draft_threads)
        return engine

    def close(self) -> None:
        """Release the streamed target's resources (files, buffers, threads); generate then raises
        EngineClosedError. Safe to call twice; a resident target has nothing to release.

        A generation in flight on another thread ends first, with EngineClosedError (a pass waiting on
        storage is interrupted, a resident one finishes its round); close() returns once it has. From
        a streamer callback, the generation ends at its next round and releases on its way out."""
        self._closed = True
        if self._generating_thread == threading.get_ident():
            return
        if self.streamed is not None:
            self.streamed.interrupt()
        with self._generating:
            if self.prefix_cache is not None:
                self.prefix_cache.clear()
            self._finalizer()

    def __enter__(self) -> "LLMCad":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def context_length(self) -> int:
        lengths = [_context(m) for m in (self.draft, self.target)]
        return min(n for n in lengths if n) if any(lengths) else 1 << 62

    @property
    def kv_positions(self) -> int | None:
        """Positions each KV cache may hold under the memory budget (None: no budget, no bound); a prompt
        of this many tokens or more leaves no room to generate (BudgetError)."""
        return self._draft_kv_positions

    def generate(self, prompt, max_new_tokens=128, *, do_sample=False, temperature=1.0, top_k=None,
                 top_p=None, seed=None, stop=None, streamer=None, trace=None) -> GenerationResult:
        """Generate up to ``max_new_tokens`` tokens after ``prompt``: a str (tokenized with the target's
        tokenizer adding special tokens as HF does), a list of token ids, or a conversation, a list of
        ``{"role", "content"}`` messages put through the tokenizer's chat template with the generation
        prompt (``apply_chat_template(messages, add_generation_prompt=True)``, see llmcad.models.chat).
        ``do_sample`` with ``temperature``, ``top_k``, ``top_p``, ``seed``: sampling as transformers
        samples (seeded: reproducible in every mode); ``temperature=0`` is greedy, as in OpenAI's API.

        Stops at the target's EOS token(s) (included in ``tokens``), at ``max_new_tokens``, at a ``stop``
        string (str or list; stops after the token that completes it), or at the context length.
        ``streamer``: an object with ``put(token_ids_tensor)``/``end()`` such as transformers.TextStreamer
        (called as generate calls it: the prompt ids first, then each committed chunk, then ``end()``),
        or a callable receiving text deltas of the generated text as tokens are committed.
        ``trace``: a file path; the timeline (IO, target compute, draft, verify/commit lanes) is written
        there as Chrome trace-event JSON (Perfetto, chrome://tracing; ``llmcad trace-plot`` draws it).

        Calls from several threads on one engine run one after the other; a call from this engine's own
        streamer callback would wait for itself and raises EngineBusyError. With a memory budget, the KV
        caches stay within what the budget leaves them: generation stops with stop reason
        "memory_budget" before a round could exceed it. With the prefix cache (see :class:`LLMCad`),
        ``stats["cached_tokens"]`` counts the prompt's tokens whose KV was reused.
        """
        if self._generating_thread == threading.get_ident():
            raise EngineBusyError("generate() was called from inside this engine's own generation (a streamer "
                                  "callback), which would wait for itself forever; call it after generate returns")
        with self._generating:
            self._generating_thread = threading.get_ident()
            try:
                return self._generate(prompt, max_new_tokens, do_sample=do_sample, temperature=temperature,
                                      top_k=top_k, top_p=top_p, seed=seed, stop=stop, streamer=streamer,
                                      trace=trace)
            except BaseException as exc:
                if self._closed and not isinstance(exc, EngineClosedError):  # a pass cut short by close()
                    raise EngineClosedError("this LLMCad engine was closed during the generation") from exc
                raise
            finally:
                self._generating_thread = None
                if self._closed:  # close() came from this generation's own streamer callback
                    self._finalizer()

    def _generate(self, prompt, max_new_tokens, *, do_sample, temperature, top_k, top_p, seed, stop, streamer,
                  trace) -> GenerationResult:
        if self._closed:
            raise EngineClosedError("this LLMCad engine was closed")
        _check_trace_path(trace)
        ids = self._encode(prompt)
        self._check_kv_room(len(ids))
        chooser = TargetChooser(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        output = _Output(self.tokenizer, self.eos_token_ids, _check_max_new(max_new_tokens), _stops(stop),
                         _check_streamer(streamer), room=self.context_length - len(ids))
        reuse = self._reuse(ids, output)
        run = _Run(self, ids, chooser, output, Tracer() if trace is not None else None, reuse)
        output.start(ids)
        with ExitStack() as stack:
            run.start(stack)
            root = ids[-1]
            while not output.done:
                if self._closed:
                    raise EngineClosedError("this LLMCad engine was closed during the generation")
                root = run.round(root)
                if not output.done and run.kv_budget_reached():
                    output.stop("memory_budget")
        self._keep_prefix(run, ids + output.tokens)
        output.close()
        stats = run.record.finish(len(output.tokens), run.drafter.steps if run.drafter else 0, output.reason,
                                  {**run.pipeline_stats(), "cached_tokens": reuse.tokens if reuse else 0,
                                   **self.memory_stats()})
        if run.tracer is not None:
            run.tracer.write(trace)
        return GenerationResult(list(output.tokens), output.text(), stats, run.record.trace)

    def memory_stats(self) -> dict:
        """The memory budget and what it is spent on: ``runtime_floor_bytes`` (resident before the weights
        loaded), ``memory_budget_bytes`` and how it was found, the largest pass in rows (None: unbounded)."""
        budget = getattr(self.placement, "budget_bytes", None)
        return {"runtime_floor_bytes": self.runtime_floor, "memory_budget_bytes": budget,
                "memory_budget_source": self.budget_source if budget is not None else None,
                "pass_rows": self.pass_rows}

    def describe_memory(self) -> str:
        """One line for the load message: the budget, where it came from, the floor, the plan."""
        floor = f"runtime floor {_mib(self.runtime_floor)}"
        if self.placement is None or self.placement.budget_bytes is None:
            return f"memory: no budget (target resident), {floor}"
        p = self.placement
        return (f"memory budget {_mib(p.budget_bytes)} ({self.budget_source or 'given'}): {floor}, "
                f"{len(p.resident_layers)} of {len(p.resident_layers) + len(p.streamed_layers)} target layers "
                f"resident, passes of up to {self.pass_rows} rows, {_mib(p.accounting.get('spare', 0))} spare")

    def _encode(self, prompt) -> list:
        if is_messages(prompt):
            ids = chat_prompt_ids(self.tokenizer, prompt)
        elif isinstance(prompt, str):
            if not prompt:
                raise PromptError("prompt is empty")
            _check_utf8(prompt)
            ids = list(self.tokenizer(prompt)["input_ids"])
        elif isinstance(prompt, (list, tuple)) or (isinstance(prompt, torch.Tensor) and prompt.dim() == 1):
            ids = _token_ids(prompt)
            vocab = self.target.get_input_embeddings().weight.shape[0]
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise PromptError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        else:
            raise PromptError(f"prompt must be a str or a list of token ids or of {{'role', 'content'}} "
                              f"messages, got {type(prompt).__name__}")
        if not ids:
            raise PromptError("prompt is empty (no tokens)")
        if len(ids) >= self.context_length:
            raise PromptError(f"prompt has {len(ids)} tokens; the models' context is {self.context_length} "
                              "positions, which leaves no room to generate")
        return ids

    def _reuse(self, ids, output):
        """The prefix cache's caches for ``ids`` (None: start empty), evicting entries until this
        generation's KV (prompt, what it may emit, a few trees' worth of draft) fits beside the rest."""
        if self.prefix_cache is None:
            return None
        need = len(ids) + min(output.max_new_tokens, output.room) + 5 * self.policy.max_tree_tokens
        if self._draft_kv_positions is not None:
            need = min(need, self._draft_kv_positions)
        return self.prefix_cache.take(ids, need, with_draft=self.policy.drafts)

    def _keep_prefix(self, run, sequence) -> None:
        """Keep the finished run's caches, cut to the committed tokens both hold, for later prompts."""
        if self.prefix_cache is None or self._closed:
            return
        n = run.verifier.committed_length
        if run.drafter is not None:
            n = min(n, run.drafter.committed_length)
        self.prefix_cache.put(sequence[:n], run.verifier.cache, run.drafter.cache if run.drafter else None)

    def _check_kv_room(self, prompt_tokens: int) -> None:
        positions = self._draft_kv_positions
        if positions is not None and prompt_tokens + 1 > positions:
            raise BudgetError(f"the prompt's {prompt_tokens} tokens leave no room to generate in the KV cache "
                              f"the memory budget leaves ({positions} positions per model); raise memory_budget")


class _Run:
    """One generate call: the verifier, the drafter, and (when pipelined) the gate and worker."""

    def __init__(self, engine: LLMCad, ids, chooser, output, tracer, reuse=None):
        self.engine, self.chooser, self.output, self.tracer = engine, chooser, output, tracer
        self.policy = engine.policy
        self.policy.reset()
        self.prompt_length = len(ids)
        # KV positions per cache this run may use: the budget's, less the prefix cache's entries
        cached = engine.prefix_cache
        self.kv_positions = cached.room() if cached is not None else engine._draft_kv_positions
        self.verifier = TargetVerifier(engine.target, ids, engine.pass_rows, engine.chunk_rows["target"],
                                       cache=reuse.target if reuse else None)
        self.drafter = (TreeDrafter(engine.draft, ids, engine.pass_rows, engine.chunk_rows["draft"],
                                    cache=reuse.draft if reuse else None, vocab_ids=engine.draft_vocab_ids)
                        if self.policy.drafts else None)
        if self.drafter is not None:
            self.drafter.tracer = tracer
        self.controller = engine.streamed
        streams = self.controller is not None and bool(self.controller.placement.streamed_layers)
        self.streams = streams
        self.pipelined = engine.pipeline and self.drafter is not None and streams
        self.gate = (ComputeGate(lockstep=engine.pipeline_lockstep,
                                 layers=len(self.controller.placement.streamed_layers)) if self.pipelined else None)
        self.worker = None
        self._prefill, self._prefill_stop = None, threading.Event()  # the prompt's prefill beside the draft
        self._prefill_ran = False
        self.record = StatsRecorder(engine.streamed, len(ids), self.policy.describe())

    def start(self, stack: ExitStack) -> None:
        """Install hooks, the IO probe and the worker; ``stack`` undoes them whatever happens."""
        if self.streams:
            self.controller.prefetch_between_passes = self.engine.prefetch
            if not self.engine.prefetch:
                self.controller.drop_prefetch()  # the pass queued at load time would start warm
        if self.gate is not None or self.tracer is not None:
            handles = install_target_hooks(self.engine.target, self.controller, self.gate, self.tracer)
            stack.callback(lambda: [h.remove() for h in handles])
        if self.tracer is not None and self.streams:
            stack.enter_context(io_lane(self.tracer, self.controller))
        if self.pipelined:
            stack.push(self._reset_ring_after_error)  # runs once the worker has been joined
            beside = self.engine.beside_rule if self.engine.draft_beside_compute else None
            self.worker = stack.enter_context(VerifyWorker(self.verifier, self.drafter, self.gate,
                                                           self.controller.next_layer_ready, self.tracer,
                                                           abort=self.controller.interrupt, beside=beside))
            stack.push(self._stop_worker_on_error)  # runs first: the worker may wait for a slow read
        if self._prefills_beside():
            if self.streams and not self.pipelined:
                stack.push(self._reset_ring_after_error)  # runs once the prefill has been joined
            pool = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmcad-prefill"))
            stack.push(self._stop_prefill)  # runs before the pool's shutdown waits for it
            self._prefill, self._prefill_ran = pool.submit(self._run_prefill), True

    def _prefills_beside(self) -> bool:
        """Whether the target caches the prompt while the draft drafts the first tree (see ``LLMCad``):
        a drafting mode, a prompt long enough to pay for a pass of its own, a core to spare; a streamed
        target, or the cost rule, when its pass model says the pass of its own pays."""
        pending = len(self.verifier.pending)
        if self.drafter is None or pending < PREFILL_BESIDE_MIN_TOKENS:
            return False
        setting = self.engine.prefill_beside
        if setting is not None:
            return bool(setting)
        if self.engine.pipeline_lockstep:  # tests: deterministic passes
            return False
        rule = getattr(self.policy, "prefill_apart_pays", None)
        pays = rule(pending) if rule is not None else None
        busy = self.engine.cpu_threads["busy_cores"]
        return _core_to_spare(self.engine.target, busy) and (pays if pays is not None else not self.streams)

    def _run_prefill(self) -> tuple:
        """The prompt's passes; returns (rows cached, seconds, of which IO waits) for the policy's probe."""
        # a resident target's passes of 256 rows: a stop waits for one of them at most
        gate, rows, t0 = self.gate, len(self.verifier.pending), time.perf_counter()
        if gate is not None:  # the draft drafts its first tree meanwhile, outside the gate
            gate.begin_pass_without_draft()
        try:
            with self._span("prefill", tokens=rows):
                self.verifier.prefill_pending(self._prefill_stop, chunk_rows=None if self.streams else 256)
        finally:
            if gate is not None:
                gate.end_verification()
        return rows - len(self.verifier.pending), time.perf_counter() - t0, gate.pass_io_wait_s if gate else 0.0

    def _stop_prefill(self, exc_type, exc, tb) -> bool:
        """No further prefill pass; on an error, a streamed pass's layer wait raises too (Ctrl-C while
        it waits on a slow read)."""
        self._prefill_stop.set()
        if exc_type is not None and self.streams:
            self.controller.interrupt()
        return False

    def _join_prefill(self) -> None:
        """Wait for the prompt's prefill beside the first tree; its error is raised here."""
        if self._prefill is not None:
            with self.record.timed("target"):
                rows, seconds, io_wait = self._prefill.result()
            self._prefill = None
            if rows:  # the pass model's probe of a row's compute, as when the prompt rides in a pass
                self.policy.observe_pass(0, seconds, rows, io_wait_s=io_wait)

    def _stop_worker_on_error(self, exc_type, exc, tb) -> bool:
        """Ctrl-C (or any error) on this thread: the worker's layer wait raises too, so joining it
        cannot wait for storage."""
        if exc_type is not None:
            self.controller.interrupt()
        return False

    def _reset_ring_after_error(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.controller.drop_prefetch()  # clears the interrupt (the worker is gone)
        return False

    def round(self, root: int) -> int:
        """Draft a tree at ``root``, verify it, emit and commit; returns the next root (the bonus)."""
        policy, output = self.policy, self.output
        t_draft = time.perf_counter()
        with self.record.timed("draft"), self._alone():
            tree = (self.drafter.grow(root, policy, self._remaining() - 1, self._kv_room())
                    if self.drafter else DraftTree.rooted(root))
        draft_s = time.perf_counter() - t_draft
        self._join_prefill()
        n, created = min(len(tree), policy.max_tree_tokens, self._target_kv_room()), len(tree)
        pending = len(self.verifier.pending)  # the prompt rides in the first pass
        if policy.best_first:  # the best-first tree's most paying head
            n = policy.verified_tokens(tree.value[:n], draft_s, pending)
        expected = sum(tree.value[1:n]) if policy.best_first else None  # the rule's expected accepted drafts
        t0 = time.perf_counter()
        with self.record.timed("target"):
            logits, provisional = self._verify(tree, n)
        # seconds the target sat blocked: on reads (IO-bound passes) and on draft steps
        gate = self.gate
        io_wait, draft_wait = (gate.pass_io_wait_s, gate.pass_draft_wait_s) if gate is not None else (0.0, 0.0)
        verified = tree.head(n)
        # node u chooses the token at absolute position committed + depth(u): the key of its sampling noise
        committed = self.prompt_length + len(output.tokens)
        with self._span("accept"), self._alone():
            # on CUDA the walk runs on the device; only the accepted ids and the bonus come back
            accepted, bonus = choose_and_accept(self.chooser, self.verifier, logits, verified,
                                                [committed + d for d in verified.depth])
        # the pass's cost includes the output head, which runs on the rows the walk chose
        policy.observe_pass(n, time.perf_counter() - t0, pending, io_wait_s=io_wait, draft_wait_s=draft_wait)
        emitted = output.extend([verified.tokens[a] for a in accepted[1:]] + [bonus])
        self.record.record_pass(n, len(accepted) - 1, emitted, expected)
        if output.done:
            self.record.record_provisional(len(provisional), 0, 0, followed=False)
            return bonus
        with self._span("commit"):
            self.verifier.commit(accepted)
            if self.drafter:
                with self.record.timed("draft"):
                    seed = self._seed(tree, accepted, bonus, provisional, n)
                    self.drafter.commit(tree, accepted, seed, max_nodes=max(len(seed), policy.max_tree_tokens))
                reused = sum(1 for node in seed if node >= created)  # provisional nodes among the seed
                self.record.record_provisional(len(provisional), reused, len(provisional) - reused)
        policy.observe(verified, accepted)
        return bonus

    def _alone(self):
        """The threads of this thread's compute while nothing else computes: the draft's steps with no pass
        in flight (the prompt's pass beside it is one) and the output head's rows after a pass."""
        if self.drafter is None or self._prefill is not None:
            return nullcontext()
        return compute_threads(self.engine.cpu_threads.get("draft_alone", torch.get_num_threads()))

    def _seed(self, tree, accepted, bonus: int, provisional: list, n: int) -> list:
        """Nodes of this round's tree that start the next one (see llmcad.speculative.pipeline)."""
        if self.policy.best_first:
            return bonus_subtree(tree, accepted, bonus, self._remaining() - 1)
        return reconcile(tree, accepted, bonus, provisional, self._max_seed_depth())

    def _verify(self, tree, n: int):
        if self.worker is not None:
            return self.worker.verify(tree, n, self._provisional_limit(tree), self.policy, self._remaining() - 1)
        with self._span("verify", nodes=n):
            return self.verifier.run(tree.tokens[:n], tree.parents[:n]), []

    def _remaining(self) -> int:
        """Tokens generate may still emit."""
        return min(self.output.max_new_tokens, self.output.room) - len(self.output.tokens)

    def _kv_room(self):
        """Draft KV positions left in the memory budget beyond the pending tokens, which ride in with the
        next root (None: no budget)."""
        if self.kv_positions is None:
            return None
        return max(0, self.kv_positions - kv.cache_length(self.drafter.cache) - len(self.drafter.pending))

    def _provisional_limit(self, tree) -> int:
        """Provisional nodes worth drafting. Best-first: ``max_provisional_tokens`` (None: up to four
        trees' worth; the IO waits bound it first); the draft KV room bounds it as it grows. Main path:
        ``max_provisional_tokens`` (None: 8), tokens still to emit beyond the main path, draft KV room."""
        limit = self.engine.max_provisional_tokens
        if self.policy.best_first:
            return 4 * self.policy.max_tree_tokens if limit is None else limit
        limit = MAIN_PATH_PROVISIONAL_TOKENS if limit is None else limit
        depth_cap = self._remaining() - 1  # as for tree nodes: a deeper node could never be emitted
        limit = min(limit, depth_cap - tree.depth[main_path(tree)[-1]])
        room = self._kv_room()
        if room is not None:
            limit = min(limit, room)
        return max(0, limit)

    def _max_seed_depth(self) -> int:
        """Draft tokens below the next root that the next tree may hold."""
        return min(self.policy.max_depth, self.policy.max_tree_tokens - 1, self._remaining() - 1)

    def kv_budget_reached(self) -> bool:
        """Whether the KV positions the memory budget left are used up: the draft's trees and provisional
        tokens are cut to its room (_kv_room, _provisional_limit; out of room, the tree is its root alone),
        the target verifies at most its own (_target_kv_room); once not even the root fits, the next pass
        would run past the budget."""
        return self._target_kv_room() < 1

    def _target_kv_room(self) -> int:
        """Tree nodes the target may verify within the memory budget's KV positions (any prefix of a
        tree is a tree: parents come first); unbounded without a budget."""
        positions = self.kv_positions
        if positions is None:
            return 1 << 30
        return positions - kv.cache_length(self.verifier.cache) - len(self.verifier.pending)

    def _span(self, name: str, **args):
        return self.tracer.span("verify", name, **args) if self.tracer is not None else nullcontext()

    def pipeline_stats(self) -> dict:
        return {**self.policy.report(), "pipeline": self.pipelined, "prefetch": self.engine.prefetch,
                "prefill_beside": self._prefill_ran, "cpu_threads": dict(self.engine.cpu_threads),
                "max_provisional_tokens": self.engine.max_provisional_tokens,
                "draft_head": getattr(self.engine.draft.get_output_embeddings(), "scheme", "float"),
                "gate_wait_s": self.gate.target_wait_s if self.gate is not None else 0.0,
                "pipelined_passes": self.worker.threaded_passes if self.worker is not None else 0,
                # provisional drafting's stop before the pass ends: steps not taken, measured step stretch
                "provisional_steps_cut": self.worker.steps_cut if self.worker is not None else 0,
                "provisional_step_stretch": self.worker.step_stretch if self.worker is not None else None,
                "draft_beside_compute": (self.engine.beside_rule.describe() if self.engine.draft_beside_compute
                                         else {"mode": "disabled"})}


class _Output:
    """Generated tokens, stop conditions and streaming of what has been committed."""

    def __init__(self, tokenizer, eos_ids, max_new_tokens, stops, streamer, room):
        self.tokenizer, self.eos_ids, self.max_new_tokens = tokenizer, eos_ids, max_new_tokens
        self.stops, self.streamer, self.room = stops, streamer, room
        self.tokens, self.done, self.reason = [], False, None
        self._sent_text = ""

    def start(self, prompt_ids) -> None:
        if hasattr(self.streamer, "put"):  # like transformers' generate: the prompt goes first
            self.streamer.put(torch.tensor(prompt_ids, dtype=torch.long))

    def extend(self, new_tokens) -> int:
        """Append tokens until one stops generation; returns how many were taken."""
        start = len(self.tokens)
        for token in new_tokens:
            self.tokens.append(int(token))
            self.reason = self._stop_reason(int(token))
            if self.reason:
                self.done = True
                break
        self._stream(self.tokens[start:], final=False)
        return len(self.tokens) - start

    def _stop_reason(self, token):
        if token in self.eos_ids:
            return "eos"
        if len(self.tokens) >= self.max_new_tokens:
            return "max_new_tokens"
        if len(self.tokens) >= self.room:
            return "context"
        if self.stops and any(s in self.text() for s in self.stops):
            return "stop"
        return None

    def stop(self, reason: str) -> None:
        self.done, self.reason = True, reason

    def text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def close(self) -> None:
        self._stream([], final=True)

    def _stream(self, new_tokens, final: bool) -> None:
        if self.streamer is None:
            return
        if hasattr(self.streamer, "put"):
            if new_tokens:
                self.streamer.put(torch.tensor(new_tokens, dtype=torch.long))
            if final:
                self.streamer.end()
            return
        text = self.text()
        if not final and text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next bytes
            return
        delta = text[len(self._sent_text):]
        if delta:
            self._sent_text = text
            self.streamer(delta)


def _core_to_spare(target, busy: int = 0) -> bool:
    """A CPU target whose torch intra-op threads leave a usable core free, ``busy`` cores being other
    processes' (CUDA: not measured, so no)."""
    if target.get_input_embeddings().weight.device.type != "cpu":
        return False
    return torch.get_num_threads() < usable_cores() - busy


def _release_streamed(streamed) -> None:
    if streamed is not None:
        streamed.close()


def _check_utf8(prompt: str) -> None:
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PromptError(f"prompt is not valid UTF-8 text (undecodable byte(s) at character {exc.start}; "
                          "e.g. a command-line argument in another encoding)") from None


def _check_trace_path(trace) -> None:
    """OutputError now, not after the whole generation, when the trace file cannot be written."""
    if trace is None:
        return
    path = Path(trace)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OutputError(f"trace={str(trace)!r}: is a directory, not a file")
    if not parent.is_dir():
        raise OutputError(f"trace={str(trace)!r}: directory {str(parent)!r} does not exist")
    if not os.access(path if path.exists() else parent, os.W_OK):
        raise OutputError(f"trace={str(trace)!r}: not writable (permission denied)")


def _eos_ids(model) -> set:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple, set)) else [eos])}


def _context(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(config, "max_position_embeddings", 0) or 0)


def check_generation_options(max_new_tokens, *, do_sample=False, temperature=1.0, top_k=None, top_p=None, seed=None,
                             stop=None) -> None:
    """generate's options checked without a model (ValueError naming the bad one): for callers that
    check their input before loading."""
    _check_max_new(max_new_tokens)
    _stops(stop)
    validate_sampling(do_sample, temperature, top_k, top_p, seed)


def _check_max_new(max_new_tokens) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected an int > 0")
    return max_new_tokens


def _token_ids(prompt) -> list:
    """A list/tuple or 1D tensor of token ids as ints; PromptError for anything but integers (a float
    id is not truncated: it is a mistake, e.g. logits or probabilities passed for ids)."""
    if isinstance(prompt, torch.Tensor):
        if prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool:
            raise PromptError(f"prompt token ids must be integers, got a tensor of {prompt.dtype}")
        return prompt.tolist()
    for i, t in enumerate(prompt):
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise PromptError(f"prompt token ids must be integers, got {t!r} ({type(t).__name__}) at index {i}")
    return [int(t) for t in prompt]


def _stops(stop) -> list:
    if stop is None:
        return []
    try:
        stops = [stop] if isinstance(stop, str) else list(stop)
    except TypeError:  # not iterable (a number, an object)
        raise ValueError(f"stop={stop!r}: expected a non-empty string or a list of them, got "
                         f"{type(stop).__name__}") from None
    if not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop={stop!r}: expected a non-empty string or a list of them")
    return stops


def _check_streamer(streamer):
    if streamer is None or hasattr(streamer, "put") or callable(streamer):
        return streamer
    raise ValueError(f"streamer={streamer!r}: expected an object with put()/end() or a callable taking text")


def unhidden_compute_share(streamed) -> float:
    """Share of a streamed target's pass compute its reads cannot hide, by bytes (compute follows the
    weights' size): the output head's and other non-layer tensors', and the resident layers' after the
    last streamed one; a resident layer before it computes while the next streamed layer is read. 0 for
    a resident target."""
    placement = streamed.placement if streamed is not None else None
    if placement is None or placement.bytes_per_pass <= 0:
        return 0.0
    last = max(placement.streamed_layers)
    hidden = sum(module_bytes(streamed.layers[i]) for i in placement.resident_layers if i < last)
    unhidden = max(0, streamed.resident_bytes - hidden)
    return unhidden / (streamed.resident_bytes + placement.bytes_per_pass)


def _pipeline_options(policy, pipeline, prefetch, max_provisional_tokens):
    """(pipeline, prefetch, max_provisional_tokens) checked; pipeline None -> on in mode llmcad."""
    if pipeline is None:
        pipeline = policy.name == "llmcad"
    if not isinstance(pipeline, bool):
        raise ValueError(f"pipeline={pipeline!r}: expected True, False or None")
    if pipeline and not policy.drafts:
        raise ValueError(f"pipeline=True needs a drafting mode; mode {policy.name!r} runs no draft")
    if not isinstance(prefetch, bool):
        raise ValueError(f"prefetch={prefetch!r}: expected True or False")
    if max_provisional_tokens is not None and (isinstance(max_provisional_tokens, bool) or not isinstance(
            max_provisional_tokens, int) or max_provisional_tokens < 0):
        raise ValueError(f"max_provisional_tokens={max_provisional_tokens!r}: expected None or an int >= 0")
    return pipeline, prefetch, max_provisional_tokens


def _check_prefix_cache(prefix_cache) -> None:
    if not isinstance(prefix_cache, bool):
        raise ValueError(f"prefix_cache={prefix_cache!r}: expected True or False")


def _check_vocab_ids(draft, ids) -> None:
    """``ids``: None, or one sorted token id per row of the draft's output layer."""
    if ids is None:
        return
    rows = output_rows(draft)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or len(ids) != rows or \
            (len(ids) > 1 and not bool((ids[1:] > ids[:-1]).all())):
        raise ValueError(f"draft_vocab_ids: expected {rows} increasing token ids, one per row of the draft's "
                         "output layer")


def _kv_position_bytes(draft, target) -> int:
    """Bytes of one KV position in both caches."""
    from llmcad.streaming.budget import kv_cache_bytes

    return kv_cache_bytes(target.config, 1, target.dtype) + kv_cache_bytes(draft.config, 1, draft.dtype)


def _budgeted_kv_positions(draft, target, placement):
    """KV positions the memory budget leaves each cache: the reservation (placement accounting) plus
    what the budget has to spare, each spare position paying for its keys and values and for what it
    adds to the largest pass's attention; None without a budget."""
    accounting = (getattr(placement, "accounting", None) or {}) if placement is not None else {}
    kv_bytes = accounting.get("kv_caches")
    if not kv_bytes:
        return None
    from llmcad.streaming.budget import pass_work_bytes

    per_position = _kv_position_bytes(draft, target)
    if not per_position:
        return None
    reserved = kv_bytes // per_position
    rows = getattr(placement, "pass_rows", None)
    if rows is not None:  # the pass's mask and expanded keys grow with the context (1024 positions: exact enough)
        grown = [pass_work_bytes(target.config, draft.config, rows, reserved + extra, target.dtype, draft.dtype)
                 for extra in (0, 1024)]
        per_position += -(-(grown[1] - grown[0]) // 1024)
    return int(reserved + max(0, accounting.get("spare", 0)) // per_position)


def _mib(nbytes) -> str:
    return f"{(nbytes or 0) / 2**20:.0f} MiB"
