"""Verification: one target pass over the flattened tree, the target's choice at every node
(argmax or a sample from the processed distribution), and the commit of the accepted path.

The target is any transformers causal LM called through its normal forward, so a layer-streamed
target (same HF model, layers bound to streamed weights) drops in by replacing ``target``.

Part of llmcad.speculative: must not import llmcad.streaming, llmcad.models, llmcad.bench or the engine.
"""
from __future__ import annotations

import numpy as np
import torch

from llmcad.speculative import kv

from llmcad.speculative import tree
from llmcad.speculative.forward import RowLogits, forward_with_mask, pending_tree_inputs, prefill


class TargetVerifier:
    """Owns the target's KV cache: committed tokens except the current root.

    ``pending``: committed tokens the target has not cached yet (the prompt minus its last token, in
    the first round); they ride along in the next tree pass, so prefill costs no extra pass, unless
    they and the tree exceed ``max_pass_rows`` (the memory budget's largest pass; None: no bound):
    then the first of them are cached in passes of their own. ``chunk_rows``: logits rows made at once.
    ``cache``: a DynamicCache that already holds the keys/values of the prompt's first tokens (fewer
    than all of them); only the rest is pending.
    """

    def __init__(self, target, prompt_ids, max_pass_rows: int | None = None, chunk_rows: int | None = None,
                 cache=None):
        from transformers import DynamicCache

        self.target = target
        self.max_pass_rows, self.chunk_rows = max_pass_rows, chunk_rows
        self.cache = DynamicCache() if cache is None else cache
        self._prefix = kv.cache_length(self.cache)
        self.pending = list(prompt_ids[self._prefix:-1])
        self.passes = 0
        self._device_tree = None  # CUDA: the verified tree's parents on the device (tree.DeviceTree)
        self._accept_record = None  # CUDA: (count, the last accept's record on the device)

    @property
    def dtype(self):
        return self.target.get_input_embeddings().weight.dtype

    @property
    def committed_length(self) -> int:
        """Leading cache positions that hold committed tokens (the positions before the last root)."""
        return min(kv.cache_length(self.cache), self._prefix)

    def prefill_pending(self, stop=None, chunk_rows: int | None = None) -> None:
        """Cache the pending tokens in passes of their own (no logits), so that the next :meth:`run` holds
        the tree alone: the prompt's prefill, run beside the draft's. Passes of at most ``chunk_rows``
        and ``max_pass_rows`` tokens (None: no bound); ``stop`` (a threading.Event): set, no further pass
        starts."""
        rows = min(chunk_rows or 1 << 30, self.max_pass_rows or 1 << 30, max(1, len(self.pending)))
        cached = kv.cache_length(self.cache)
        try:
            prefill(self.target, self.cache, self.pending, rows, stop)
        finally:  # a stopped prefill: the passes that ran are cached, the rest still pending
            self.pending = self.pending[kv.cache_length(self.cache) - cached:]
            self._prefix = kv.cache_length(self.cache)

    def run(self, tokens, parents) -> RowLogits:
        """The target's logits at every tree node ([n, vocab], made in chunks of rows when read). One
        forward, all n nodes (after passes caching a prompt too long to ride along)."""
        rows = self.max_pass_rows
        if rows is not None and len(self.pending) + len(tokens) > rows:
            split = len(self.pending) - max(0, rows - len(tokens))
            prefill(self.target, self.cache, self.pending[:split], rows)
            self.pending = self.pending[split:]
        cache_len = kv.cache_length(self.cache)
        device = self.target.get_input_embeddings().weight.device
        # CUDA: one upload of the parents serves the plan and the acceptance walk
        self._device_tree = tree.DeviceTree(parents, device) if device.type == "cuda" else None
        mask, positions = pending_tree_inputs(cache_len, len(self.pending), self._device_tree or parents,
                                              self.dtype, device)
        logits = forward_with_mask(self.target, self.cache, self.pending + list(tokens), positions, mask,
                                   logits_to_keep=len(tokens), chunk_rows=self.chunk_rows)
        self._prefix = cache_len + len(self.pending)
        self.pending = []
        self.passes += 1
        return logits

    def accept(self, parents, tokens, choice):
        """The acceptance walk over the verified tree: ``(accepted node ids, bonus)`` as
        :func:`llmcad.speculative.tree.accept`. With ``choice`` on a CUDA device the walk runs there (current
        stream) on the parents uploaded for the pass, and only the accepted ids and the bonus come back,
        in one small copy; the device record is kept for :meth:`commit`."""
        self._accept_record = None
        if not getattr(choice, "is_cuda", False):
            return tree.accept(parents, tokens, choice)
        device_tree = self._device_tree
        if device_tree is None or device_tree.device != choice.device or not device_tree.same_tree(parents):
            device_tree = self._device_tree = tree.DeviceTree(parents, choice.device)
        accepted, bonus, record = device_tree.accept(tokens, choice)
        self._accept_record = (len(accepted), record)
        return accepted, bonus

    def commit(self, accepted) -> None:
        """Keep prefix + accepted path (root first) in the target's cache. Decided on the host; on CUDA
        the gather indices are made on the device from the last accept's record (no transfer)."""
        keep = tree.commit_indices(accepted, self._prefix)
        record, self._accept_record = self._accept_record, None
        device_keep = None
        if record is not None and record[0] == len(accepted) and self._device_tree is not None:
            device_keep = self._device_tree.commit_indices(record[1], record[0], self._prefix)
        kv.commit(self.cache, keep, device_keep=device_keep)


MIN_TEMPERATURE = 1e-6  # logits / temperature stays finite in float32 for any |logit| below ~3e32


FIRST_ROWS = 16  # the least rows of a lazy walk's first batch
# a node whose path value (the chance the walk visits it) is at least this joins the first batch: on
# CPUs measured, a head row costs about this share of one more batch (a batch reads the whole layer)
HEAD_ROW_VALUE = 0.03
MORE_ROWS = 16  # rows a batch adds where the walk reached a node whose choice is unknown


def choose_and_accept(chooser, verifier, logits, verified, positions):
    """The target's choices and the acceptance walk over ``verified`` (a DraftTree, one row of ``logits``
    a node): ``(accepted, bonus)`` as :meth:`TargetVerifier.accept`.

    The walk visits one node a depth, so on host logits made by an output layer (:class:`RowLogits` with
    a head) that layer runs only on rows the walk may visit: the most valuable first (path values; twice
    the expected accepted length and ``FIRST_ROWS`` more, and every node of value ``HEAD_ROW_VALUE`` or
    more), then ``MORE_ROWS`` of the subtree where the
    walk reached a node not chosen yet (an unknown choice is -1, a token no child holds, so the walk
    stops there), until it ends on a chosen node. The walk and the choices are those of every row chosen
    at once. Elsewhere (CUDA, logits already made) every row is chosen at once.
    ``positions``: each row's absolute position (the key of its sampling noise)."""
    parents, tokens, values, n = verified.parents, verified.tokens, verified.value, len(verified)
    if not _head_on_host(logits) or n <= FIRST_ROWS:
        return verifier.accept(parents, tokens, chooser.choose(logits, positions))
    order = sorted(range(n), key=lambda u: -values[u])  # stable: ties in tree order
    choice = np.full(n, -1, dtype=np.int32)
    likely = sum(1 for u in order if values[u] >= HEAD_ROW_VALUE)
    batch = order[:max(likely, FIRST_ROWS + 2 * int(np.ceil(sum(values[1:]))))]
    while True:
        rows = [u for u in batch if choice[u] < 0]
        choice[rows] = chooser.choose(logits.select(rows), [positions[u] for u in rows])
        accepted, bonus = verifier.accept(parents, tokens, choice)
        if bonus >= 0:
            return accepted, bonus
        below = set(verified.subtree(int(accepted[-1])))
        batch = [u for u in order if u in below and choice[u] < 0][:MORE_ROWS]


def _head_on_host(logits) -> bool:
    return isinstance(logits, RowLogits) and logits.head is not None and not logits.hidden.is_cuda


def validate_sampling(do_sample, temperature, top_k, top_p, seed) -> None:
    """ValueError naming the first bad sampling parameter. Temperature 0 is greedy (as in OpenAI's API
    and llama.cpp)."""
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample={do_sample!r}: expected True or False")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0 \
            or not np.isfinite(temperature):
        raise ValueError(f"temperature={temperature!r}: expected a finite number >= 0 (0: greedy)")
    if 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature={temperature!r}: below {MIN_TEMPERATURE:g} the scaled logits overflow "
                         "(for greedy decoding, use temperature 0 or turn sampling off)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k={top_k!r}: expected None or an int >= 1")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p={top_p!r}: expected None or a number in (0, 1]")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
                             or not 0 <= seed < 2 ** 64):
        raise ValueError(f"seed={seed!r}: expected None or an int in [0, 2**64)")


class TargetChooser:
    """The target's token at each node: argmax (greedy) or a sample from the distribution that
    transformers' sampler would use (temperature, then top-k, then top-p, the same warpers in the same
    order). Temperature 0 is greedy, whatever ``do_sample`` says.

    A sample is an exponential race, ``argmax(probs / E)`` with ``E ~ Exp(1)`` per vocabulary entry (the
    Gumbel-max trick), and the noise of the token at absolute position ``t`` comes from a generator
    seeded with (seed, t) alone. So a token depends only on the text before it, the seed and its
    position: every mode, pipelined or not, samples exactly what target-only samples.
    """

    def __init__(self, *, do_sample=False, temperature=1.0, top_k=None, top_p=None, seed=None):
        validate_sampling(do_sample, temperature, top_k, top_p, seed)
        self.do_sample = do_sample and temperature != 0  # temperature 0: greedy
        self.processors = _warpers(temperature, top_k, top_p) if self.do_sample else None
        self.seed = int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,)).item())

    def processed_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Sampling distribution at each row of ``logits`` [n, vocab] -> probs [n, vocab]."""
        scores = self.processors(_NO_IDS, logits.float())
        return torch.softmax(scores, dim=-1)

    def choose(self, logits, positions=None):
        """One token per row of ``logits`` (a tensor [n, vocab] or :class:`RowLogits`, read a chunk of rows
        at a time): int32 [n], a NumPy array for CPU logits and a tensor on the logits' device for CUDA
        logits (no host copy: the acceptance walk runs there). ``positions``: absolute position of the
        token each row chooses (default 0..n-1); it keys the sampling noise."""
        chunks = [(0, logits)] if isinstance(logits, torch.Tensor) else logits.chunks()
        positions = list(range(len(logits))) if positions is None else list(positions)
        picks = [self._choose_rows(rows, positions[start:start + rows.shape[0]]) for start, rows in chunks]
        picks = torch.cat(picks) if picks else torch.empty(0, dtype=torch.int32)
        return picks if picks.is_cuda else picks.cpu().numpy()

    def _choose_rows(self, logits: torch.Tensor, positions) -> torch.Tensor:
        if not self.do_sample:
            return logits.argmax(dim=-1).to(torch.int32)
        probs = self.processed_probs(logits)
        noise = torch.stack([exponential_noise(self.seed, int(t), probs.shape[1], probs.device) for t in positions])
        return (probs / noise).argmax(dim=-1).to(torch.int32)


def exponential_noise(seed: int, position: int, size: int, device) -> torch.Tensor:
    """Exp(1) noise [size] for the token at ``position``: a generator keyed on (seed, position) only."""
    generator = torch.Generator(device=device)
    generator.manual_seed(_mix64(seed, position))
    return torch.empty(size, dtype=torch.float32, device=device).exponential_(generator=generator).clamp_min_(1e-30)


def _mix64(seed: int, position: int) -> int:
    """SplitMix64 of (seed, position): distinct, well-spread generator seeds for nearby positions."""
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & mask
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        z = ((z ^ (z >> shift)) * mult) & mask
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


_NO_IDS = torch.empty((1, 0), dtype=torch.long)  # the warpers used here never read input_ids


def _warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    processors = LogitsProcessorList()
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(float(temperature)))
    if top_k is not None:
        processors.append(TopKLogitsWarper(top_k=int(top_k), min_tokens_to_keep=1))
    if top_p is not None and top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=float(top_p), min_tokens_to_keep=1))
    return processors
