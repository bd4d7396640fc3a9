"""The LLMCad engine: draft a tree, verify it in one target pass, commit the accepted path, repeat."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import tree as tree_api
from .draft import DraftTree, TreeDrafter
from .errors import EngineClosedError, PromptError
from .fallback import POLICIES, Policy, make_policy
from .models import load_pair, resolve_device, resolve_dtype
from .stats import StatsRecorder
from .verify import TargetChooser, TargetVerifier


@dataclass
class GenerationResult:
    """``tokens``: generated ids (EOS included when reached, like transformers); ``text``: their decoding
    without special tokens; ``stats``: counters and timings (JSON-ready); ``trace``: one dict per pass."""

    tokens: list
    text: str
    stats: dict
    trace: list = field(default_factory=list)


class LLMCad:
    """A draft/target pair and a verification policy.

    ``target`` is any transformers causal LM (resident, or a layer-streamed drop-in): it is only ever
    called through its ordinary forward with a float 4D mask, explicit positions and a DynamicCache.
    """

    modes = tuple(POLICIES)

    def __init__(self, draft, target, tokenizer, policy: Policy, *, placement=None):
        self.draft = draft
        self.target = target
        self.tokenizer = tokenizer
        self.policy = policy
        self.placement = placement
        self.eos_token_ids = _eos_ids(target)
        self._closed = False

    @classmethod
    def from_pretrained(cls, draft, target, *, mode="llmcad", memory_budget=None, device="cpu", dtype=None,
                        **policy_options) -> "LLMCad":
        """Load a draft/target pair (local HF directories or hub ids).

        ``mode``: "llmcad" (tree + LLMCad fallback), "tree" (fixed-size tree), "chain" (fixed-length
        chain) or "target-only" (one token a pass). ``policy_options``: that mode's parameters
        (max_tree_tokens, max_depth, branch_threshold, alpha, chain_length; see llmcad.fallback).
        ``memory_budget``: None keeps the target resident. ``dtype``: None keeps the checkpoint's.
        """
        policy = make_policy(mode, **policy_options)  # fail on a bad option before loading anything
        resolve_device(device)
        resolve_dtype(dtype)
        pair = load_pair(draft, target, device=device, dtype=dtype, memory_budget=memory_budget)
        return cls(pair.draft, pair.target, pair.tokenizer, policy, placement=pair.placement)

    def close(self) -> None:
        """Release the streamed target's resources (files, buffers, threads); generate then raises
        EngineClosedError. Safe to call twice; a resident target has nothing to release."""
        self._closed = True
        controller = getattr(self.target, "llmcad_streamed", None)
        if controller is not None:
            controller.close()

    def __enter__(self) -> "LLMCad":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def context_length(self) -> int:
        lengths = [_context(m) for m in (self.draft, self.target)]
        return min(n for n in lengths if n) if any(lengths) else 1 << 62

    def generate(self, prompt, max_new_tokens=128, *, do_sample=False, temperature=1.0, top_k=None,
                 top_p=None, seed=None, stop=None, streamer=None) -> GenerationResult:
        """Generate up to ``max_new_tokens`` tokens after ``prompt`` (str, tokenized with the target's
        tokenizer adding special tokens as HF does, or a list of token ids).

        Stops at the target's EOS token(s) (included in ``tokens``), at ``max_new_tokens``, at a ``stop``
        string (str or list; stops after the token that completes it), or at the context length.
        ``streamer``: an object with ``put(token_ids_tensor)``/``end()`` such as transformers.TextStreamer
        (called as generate calls it: the prompt ids first, then each committed chunk, then ``end()``),
        or a callable receiving text deltas of the generated text as tokens are committed.
        """
        if self._closed:
            raise EngineClosedError("this LLMCad engine was closed")
        ids = self._encode(prompt)
        chooser = TargetChooser(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        output = _Output(self.tokenizer, self.eos_token_ids, _check_max_new(max_new_tokens), _stops(stop),
                         _check_streamer(streamer), room=self.context_length - len(ids))
        output.start(ids)
        policy = self.policy
        policy.reset()
        verifier = TargetVerifier(self.target, ids)
        drafter = TreeDrafter(self.draft, ids) if policy.drafts else None
        record = StatsRecorder(self.target, len(ids), policy.describe())
        root = ids[-1]
        while not output.done:
            with record.timed("draft"):
                depth_cap = min(max_new_tokens, output.room) - len(output.tokens) - 1
                tree = drafter.grow(root, policy, depth_cap) if drafter else DraftTree.rooted(root)
            with record.timed("target"):
                logits = verifier.run(tree.tokens, tree.parents)
            accepted, bonus = tree_api.accept(tree.parents, tree.tokens, chooser.choose(logits))
            emitted = output.extend([tree.tokens[a] for a in accepted[1:]] + [bonus])
            record.record_pass(len(tree), len(accepted) - 1, emitted)
            if output.done:
                break
            verifier.commit(accepted)
            if drafter:
                with record.timed("draft"):
                    drafter.commit(tree, accepted)
            policy.observe(tree, accepted)
            root = bonus
        output.close()
        stats = record.finish(len(output.tokens), drafter.steps if drafter else 0, output.reason)
        return GenerationResult(list(output.tokens), output.text(), stats, record.trace)

    def _encode(self, prompt) -> list:
        if isinstance(prompt, str):
            if not prompt:
                raise PromptError("prompt is empty")
            ids = list(self.tokenizer(prompt)["input_ids"])
        elif isinstance(prompt, (list, tuple)) or (isinstance(prompt, torch.Tensor) and prompt.dim() == 1):
            ids = [int(t) for t in prompt]
            vocab = self.target.get_input_embeddings().weight.shape[0]
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise PromptError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        else:
            raise PromptError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise PromptError("prompt is empty (no tokens)")
        if len(ids) >= self.context_length:
            raise PromptError(f"prompt has {len(ids)} tokens; the models' context is {self.context_length} "
                              "positions, which leaves no room to generate")
        return ids


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


def _check_max_new(max_new_tokens) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected an int > 0")
    return max_new_tokens


def _stops(stop) -> list:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop={stop!r}: expected a non-empty string or a list of them")
    return stops


def _check_streamer(streamer):
    if streamer is None or hasattr(streamer, "put") or callable(streamer):
        return streamer
    raise ValueError(f"streamer={streamer!r}: expected an object with put()/end() or a callable taking text")
