"""The layer-streamed target: an HF causal LM whose decoder layers are read from storage per pass.

The model is built from its config on the meta device. Non-layer tensors (final norm, lm_head) and
the placement's resident layers (spread among the streamed ones) are loaded resident; the input embedding, when the placement says so, is read row
by row per pass (:mod:`llmcad.streaming.sparse`); every other decoder layer gets a forward
pre-hook that acquires its bytes from the :class:`~llmcad.streaming.streamer.WeightStreamer` and binds each
parameter to a zero-copy view of the buffer (or a converted copy when the compute dtype differs),
and a forward hook that puts the parameters back on meta and releases the buffer. On a CUDA device
the bytes reach the GPU through a :class:`~llmcad.streaming.gpu_upload.DeviceFeed`: a device ring filled on a
side stream, the next layer's upload overlapping this layer's compute ("copy"), or the pinned buffer
in place ("zero-copy", integrated GPUs). HF's own forward (rotary, masks, cache) runs unchanged, so
logits are bit-identical to the in-memory model.

Passes: a wrapper around the decoder stack's forward queues every streamed layer of the pass in
order (the ring bounds what is in flight); when a pass ends, the next pass's layers are queued at
once so the ring fills while the draft drafts. A pass that raised midway (KeyboardInterrupt too)
resets the ring. A weight file modified in place after indexing closes the target with a
WeightFileError instead of ever computing on changed bytes.

The engine and the pipeline are handed the :class:`StreamedTarget` itself (``model`` is the HF
model to call); readiness (:meth:`StreamedTarget.next_layer_ready`), per-load timing
(:meth:`StreamedTarget.loads_since`, recorded by the C++ IO thread) and counters (``stats()``) are
its methods. Hook order per streamed layer is fixed in one place, its bind pre-hook: the acquire
watchers' ``before``, the acquire, the parameter binding, the watchers' ``after``, then the layer's
own compute (see :meth:`StreamedTarget.watch_acquire`).

Part of llmcad.streaming: must not import llmcad.speculative, llmcad.models, llmcad.bench or the engine.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch.utils.hooks import RemovableHandle

from llmcad import memory
from llmcad.streaming.budget import (Placement, kv_cache_bytes, module_bytes, pass_work_bytes, plan_placement,
                                    resident_placement)
from llmcad.errors import EngineClosedError, ModelLoadError, WeightFileError
from llmcad.streaming.gpu_upload import DEVICE_SLOTS, DeviceFeed, resolve_gpu_path
from llmcad.streaming.quantized import check_scales, pack_resident, quantize_modules, scheme_of
from llmcad.streaming.sparse import SparseRows
from llmcad.streaming.weights import WeightIndex, iter_tensors, load_index, open_weight_file, stat_stamp


def load_streamed_target(path, *, placement: Placement | None = None, dtype=None, device="cpu",
                         streamer_options: dict | None = None, attn_implementation: str | None = None,
                         trust_remote_code: bool = False):
    """Build the streamed target of checkpoint directory ``path``.

    ``placement``: from :func:`llmcad.streaming.budget.plan_placement` (None: every layer resident).
    ``dtype``: compute dtype (None: the checkpoint's). ``streamer_options``: extra WeightStreamer
    keyword arguments (backend, direct, ...), plus ``gpu_path`` for a CUDA ``device``: "auto" (default:
    zero-copy on an integrated GPU, else copy), "copy" or "zero-copy" (see llmcad.streaming.gpu_upload).
    ``trust_remote_code``: run Python code the directory ships (auto_map); never without it.
    Returns the :class:`StreamedTarget`; its ``model`` is the HF model (eval mode) to call.
    """
    path = Path(path)
    index = load_index(path)
    placement = placement or resident_placement(index)
    _check_placement(index, placement)
    device = torch.device(device)
    dtype = dtype or checkpoint_dtype(index)
    model = _build_on_meta(path, dtype, device, attn_implementation, trust_remote_code)
    if scheme_of(model.config) is not None:
        check_scales(index)
    layers = decoder_layers(model)
    if len(layers) != index.num_layers:
        raise ModelLoadError(f"{path}: config has {len(layers)} decoder layers, the weights {index.num_layers}")
    _load_resident(model, index, placement, dtype, device)
    pack_resident(model, placement.resident_layers)
    return StreamedTarget(model, index, placement, device, streamer_options or {})


DEFAULT_KV_TOKENS = 2048  # cache positions budgeted per model when the caller does not say


def load_budgeted_target(path, *, memory_budget, draft_model, dtype=None, device="cpu",
                         kv_tokens: int | None = None, num_buffers: int = 2, streamer_options: dict | None = None,
                         runtime_floor: int | None = None, trust_remote_code: bool = False):
    """Plan the target's placement under ``memory_budget`` next to ``draft_model``, then load it.

    The budget covers the runtime (``runtime_floor``; None: llmcad.memory.runtime_floor(), this
    process's, measured once; 0: not counted), the draft's weights (as loaded), the target's resident tensors and ring, both KV caches
    at ``kv_tokens`` positions (default: DEFAULT_KV_TOKENS, capped by the context) and the working
    set of the largest pass (see :func:`plan_budget`). Returns the :class:`StreamedTarget` (its
    ``placement`` is the plan); raises BudgetError (a ValueError) when the budget is too small.
    """
    placement = plan_budget(path, memory_budget=memory_budget, draft_config=draft_model.config,
                            draft_bytes=module_bytes(draft_model), draft_dtype=draft_model.dtype, dtype=dtype,
                            device=device, kv_tokens=kv_tokens, num_buffers=num_buffers,
                            streamer_options=streamer_options, runtime_floor=runtime_floor,
                            trust_remote_code=trust_remote_code)
    return load_streamed_target(path, placement=placement, dtype=dtype, device=device,
                                streamer_options=streamer_options, trust_remote_code=trust_remote_code)


def plan_budget(path, *, memory_budget, draft_config, draft_bytes: int, draft_dtype, dtype=None, device="cpu",
                kv_tokens: int | None = None, num_buffers: int = 2, streamer_options: dict | None = None,
                runtime_floor: int | None = None, trust_remote_code: bool = False) -> Placement:
    """The placement of target ``path`` under ``memory_budget`` beside a draft of ``draft_config``
    holding ``draft_bytes`` in ``draft_dtype``; nothing is loaded (callable before the draft loads,
    with its bytes estimated, to refuse a budget before any weight is read). The working set of a
    pass (both models' activations and logits chunks, llmcad.streaming.budget.pass_work_bytes) is
    reserved at the KV positions budgeted. ``runtime_floor``: as for :func:`load_budgeted_target`."""
    from transformers import AutoConfig

    index = load_index(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    dtype = dtype or checkpoint_dtype(index)
    if kv_tokens is None:
        kv_tokens = min(DEFAULT_KV_TOKENS, getattr(config, "max_position_embeddings", None) or DEFAULT_KV_TOKENS)
    kv = kv_cache_bytes(config, kv_tokens, dtype) + kv_cache_bytes(draft_config, kv_tokens, draft_dtype)
    gpu_path = resolve_gpu_path((streamer_options or {}).get("gpu_path", "auto"), device)

    def work(rows):
        return pass_work_bytes(config, draft_config, rows, kv_tokens, dtype, draft_dtype)

    return plan_placement(index, memory_budget=memory_budget, dtype=dtype, draft_bytes=draft_bytes, kv_bytes=kv,
                          num_buffers=num_buffers, device_slots=DEVICE_SLOTS if gpu_path == "copy" else 0,
                          runtime_floor=memory.runtime_floor() if runtime_floor is None else runtime_floor,
                          work=work)


def decoder_layers(model, source=None) -> torch.nn.ModuleList:
    """``model.model.layers``; ModelLoadError naming ``source`` (or the class) when it is not a ModuleList."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        what = f"model {str(source)!r} ({type(model).__name__})" if source is not None else type(model).__name__
        raise ModelLoadError(f"{what} is not a decoder-only causal LM whose layers are a ModuleList at "
                             "model.model.layers")
    return layers


class StreamedTarget:
    """A layer-streamed HF causal LM: ``model`` (call it as usual), its ``placement``, the streamer.

    Binds streamed layers per pass; counts bytes; owns the streamer and the weight files."""

    def __init__(self, model, index: WeightIndex, placement: Placement, device, streamer_options):
        self.model = model
        self.placement = placement
        self.index = index
        self._model, self._device = model, device
        self._options = dict(streamer_options)
        # CUDA: "copy" (device ring, side stream) or "zero-copy" (pinned buffer in place); None off CUDA
        self.gpu_path = resolve_gpu_path(self._options.pop("gpu_path", "auto"), device)
        self._feed = None  # llmcad.streaming.gpu_upload.DeviceFeed when gpu_path is set
        self._layers = decoder_layers(model)
        self._streamed = list(placement.streamed_layers)
        self._bindings = {i: _layer_bindings(self._layers[i], index, i) for i in self._streamed}
        self._streamer = None
        self._sparse = []  # llmcad.streaming.sparse.SparseRows of the tensors read by rows
        self._sparse_mark = 0  # their bytes read when the current pass began
        self._ring_bytes = 0  # the streamer's buffer memory
        self._lock = threading.Lock()
        self._closed = False
        self._pass_next = 0  # position in self._streamed of the next layer to bind this pass
        self._queued = 0  # layers of the coming pass already prefetched
        self._in_pass = False
        self._held = None  # the layer acquired and not yet released
        self.bytes_read = 0  # payload bytes of streamed layers, cumulative
        self.last_pass_bytes = 0
        self.passes = 0
        self.bind_wait_s = 0.0  # time blocked in acquire
        self.prefetch_between_passes = True  # False: a pass's reads start only when the pass begins
        self._acquire_watchers = OrderedDict()  # handle id -> (before(i), after(i)); see watch_acquire
        self.resident_bytes = module_bytes(model)
        self.peak_tracked_bytes = self.resident_bytes
        self._hooks = []
        self._closed_reason = None
        self._fds = [_open_stamped(path, stamp) for path, stamp in zip(index.files, index.stamps)]
        self._sparse = [self._sparse_rows(name) for name in placement.sparse_tensors]
        if self._streamed:
            self._open_streamer()
        if self._streamed or self._sparse:
            self._install_hooks()
            self._queue_next_pass()  # the first pass's reads start now

    # ---- public ----
    @property
    def streamer(self):
        return self._streamer

    @property
    def memory_bytes(self) -> int:
        """Resident tensors, the cached embedding rows, the streamer's buffers and the device upload ring
        (the KV cache is the engine's)."""
        return self.resident_bytes + self.sparse_cache_bytes + self._ring_bytes + self.device_ring_bytes

    @property
    def sparse_cache_bytes(self) -> int:
        """Memory of the rows cached for the tensors read by rows (the input embedding)."""
        return sum(rows.memory_bytes for rows in self._sparse)

    @property
    def sparse_bytes_read(self) -> int:
        """Bytes the row reads took from storage, cumulative (included in ``bytes_read``)."""
        return sum(rows.bytes_read for rows in self._sparse)

    @property
    def device_ring_bytes(self) -> int:
        """Device memory of the copy path's upload ring (0 off CUDA and for zero-copy)."""
        return self._feed.device_bytes if self._feed is not None else 0

    def stats(self) -> dict:
        out = dict(self.placement.summary(), bytes_read=self.bytes_read, passes=self.passes,
                   bind_wait_s=self.bind_wait_s, resident_bytes=self.resident_bytes,
                   device_ring_bytes=self.device_ring_bytes, memory_bytes=self.memory_bytes,
                   sparse_bytes_read=self.sparse_bytes_read, sparse_cache_bytes=self.sparse_cache_bytes,
                   peak_tracked_bytes=self.peak_tracked_bytes)
        if self._streamer is not None:
            out["streamer"] = self._streamer.stats()
        if self._feed is not None:
            out["gpu"] = self._feed.stats()
        return out

    @property
    def layers(self) -> torch.nn.ModuleList:
        """The model's decoder layers."""
        return self._layers

    def watch_acquire(self, before, after) -> RemovableHandle:
        """Call ``before(i)`` right before streamed layer ``i``'s bytes are acquired (the acquire may
        block on IO) and ``after(i)`` once they are bound, right before the layer computes. The one
        place hook order is defined: both run inside this target's bind pre-hook, in the order
        watchers were added. Returns a handle; ``handle.remove()`` stops the calls."""
        handle = RemovableHandle(self._acquire_watchers)
        self._acquire_watchers[handle.id] = (before, after)
        return handle

    def load_mark(self) -> int:
        """A mark for :meth:`loads_since`: loads finished from now on have a seq >= it."""
        return self._streamer.loads_finished if self._streamer is not None else 0

    def loads_since(self, mark: int = 0) -> list:
        """Per-load records (:class:`llmcad.streaming.streamer.LoadRecord`, ``time.perf_counter()``
        times) of the loads finished since ``mark``, with ``layer_id`` the decoder layer index."""
        if self._streamer is None:
            return []
        return [dataclasses.replace(r, layer_id=self._layer_of_sid[r.layer_id])
                for r in self._streamer.loads_since(mark)]

    def drop_prefetch(self) -> None:
        """Forget the reads queued for the next pass, so it starts cold (benchmarks)."""
        if self._streamer is not None and not self._in_pass and not self._closed:
            self._streamer.reset()
            self._queued = 0

    def interrupt(self) -> None:
        """Make a layer wait on another thread (the pipeline's worker) raise KeyboardInterrupt, now or
        at its next acquire, until the ring is reset (drop_prefetch, or the failed pass's own reset)."""
        if self._streamer is not None and not self._closed:
            self._streamer.interrupt()

    def close(self, reason: str | None = None) -> None:
        """Stop the streamer; later forwards raise EngineClosedError. Idempotent, never blocks on IO."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._closed_reason = reason
            for fd in self._fds:
                os.close(fd)
            self._fds = []
            for h in self._hooks:
                h.remove()
            self._hooks.clear()
            self._model.model.__dict__.pop("forward", None)  # drop the pass wrapper
            for i in self._streamed:
                self._unbind(i)
            for rows in self._sparse:
                rows.remove()
            if self._streamer is not None:
                self._streamer.close()
        if self._streamed or self._sparse:  # a forward after close must fail loudly, not run on meta tensors
            self._hooks.append(self._model.model.register_forward_pre_hook(self._refuse))

    def next_layer_ready(self) -> bool:
        """True when the next streamed layer's read has finished (its acquire will not block); the
        pipeline's compute gate asks this before each streamed layer."""
        if self._streamer is None:
            return True
        if self._closed:
            return False
        if self._feed is not None and self._in_pass and self._pass_next < len(self._streamed) \
                and self._feed.uploaded(self._streamed[self._pass_next]):
            return True  # copy path: the awaited layer's host read is done, its upload queued already
        return self._streamer.next_ready()  # the host read (copy path: before its upload, in the gate)

    # ---- streamer ----
    def _sparse_rows(self, name: str) -> SparseRows:
        """Row reads for tensor ``name`` (an embedding weight) through the stamped descriptor of its file."""
        entry = self.index.tensors[name]
        owner_name, _, attr = name.rpartition(".")
        module = self._model.get_submodule(owner_name)
        meta = module._parameters[attr]
        return SparseRows(module, entry, self._fds[entry.file_index], self.index.files[entry.file_index],
                          dtype=meta.dtype, device=self._device)

    def _open_streamer(self):
        from llmcad.streaming.streamer import WeightStreamer, layout_bytes

        p = self.placement
        self._streamer = WeightStreamer([str(f) for f in self.index.files], buffer_bytes=p.buffer_bytes,
                                        num_buffers=p.num_buffers, **self._options)
        self._ring_bytes = self._streamer.memory_bytes
        self._check_streamer_files()
        self._sid = {}  # decoder layer index -> streamer layer id
        slot_bytes = 0
        for i in self._streamed:
            ranges = [(t.file_index, t.offset, t.length) for t, _ in self._bindings[i]]
            self._sid[i] = self._streamer.add_layer(ranges)
            slot_bytes = max(slot_bytes, layout_bytes(ranges))
        self._layer_of_sid = {sid: i for i, sid in self._sid.items()}
        if self.gpu_path is not None:
            self._feed = DeviceFeed(self.gpu_path, self._device, acquire=self._acquire,
                                    release=lambda i: self._streamer.release(self._sid[i]),
                                    host_buffers=p.num_buffers, slot_bytes=slot_bytes,
                                    read_ready=self._streamer.next_ready)

    def _check_streamer_files(self):
        """The streamer opens its files by path: each must be the file that was indexed and validated
        (a file replaced in between would be read with no error, as weights of neither model)."""
        for path, st, stamp in zip(self.index.files, self._streamer.file_stats(), self.index.stamps):
            if not _same_file(st, stamp):
                self._streamer.close()
                raise WeightFileError(f"{path}: replaced on disk while the model was loading (the file the "
                                      "streamer opened is not the one indexed); load it again")

    def _queue_next_pass(self):
        """Prefetch every streamed layer of the next pass, in order; the ring bounds the reads."""
        for i in self._streamed[self._queued:]:
            self._streamer.prefetch(self._sid[i])
        self._queued = len(self._streamed)

    def _reset_ring(self):
        """After a pass that raised: drop whatever the ring holds, unbind, start the next pass clean."""
        for i in self._streamed:
            self._unbind(i)
        self._held = None
        if self._feed is not None:
            self._feed.reset()  # no copy or kernel may still read a buffer the ring is about to reuse
        if self._streamer is not None:
            self._streamer.reset()
        self._queued = 0
        if self.prefetch_between_passes:
            self._queue_next_pass()

    # ---- hooks ----
    def _install_hooks(self):
        base = self._model.model
        base.forward = self._wrap_pass(base.forward)
        for i in self._streamed:
            layer = self._layers[i]
            self._hooks.append(layer.register_forward_pre_hook(self._make_bind(i)))
            self._hooks.append(layer.register_forward_hook(self._make_release(i), always_call=True))

    def _wrap_pass(self, forward):
        """The decoder stack's forward inside begin/end of a pass. A wrapper, not hooks: torch skips
        always_call hooks on a BaseException (KeyboardInterrupt), and the ring must be reset then too."""
        @functools.wraps(forward)
        def streamed_pass(*args, **kwargs):
            self._begin_pass()
            try:
                out = forward(*args, **kwargs)
            except BaseException as exc:
                self._end_pass(complete=False)
                if isinstance(exc, Exception) and not self._closed:
                    self._raise_if_files_changed()  # e.g. a short read from a file truncated in place
                raise
            self._end_pass(complete=self._pass_next == len(self._streamed))
            self._raise_if_files_changed()  # bytes read during the pass may be of the changed file
            return out
        return streamed_pass

    def _refuse(self, module, args):
        raise EngineClosedError(self._closed_message())

    def _closed_message(self) -> str:
        after = f" after {self._closed_reason}" if self._closed_reason else ""
        return f"the streamed target was closed{after}"

    def _raise_if_files_changed(self) -> None:
        """A weight file modified in place since indexing makes every later read suspect: close, raise.
        (A file replaced by a new one is harmless: the open descriptors still read the old inode.)"""
        for path, fd, stamp in zip(self.index.files, self._fds, self.index.stamps):
            if not _same_file(os.fstat(fd), stamp):
                self.close(reason=f"{path} changed on disk")
                raise WeightFileError(f"{path}: changed on disk after the model was loaded (size, modification "
                                      "or status-change time differ from when it was indexed); load the model again")

    def _begin_pass(self):
        if self._closed:
            raise EngineClosedError(self._closed_message())
        self._raise_if_files_changed()
        self._in_pass = True
        self._pass_next = 0
        self.last_pass_bytes = 0
        self._sparse_mark = self.sparse_bytes_read
        self._queue_next_pass()

    def _end_pass(self, complete: bool):
        rows = self.sparse_bytes_read - self._sparse_mark
        self.bytes_read += rows
        self.last_pass_bytes += rows
        self._in_pass = False
        self._pass_next = 0
        self._queued = 0
        if self._closed:
            return
        if complete:
            if self._feed is not None:
                self._feed.finish_pass()  # every host buffer back before the next pass's reads
            self.passes += 1
            if self.prefetch_between_passes:
                self._queue_next_pass()  # prefetch while drafting
        else:
            self._reset_ring()

    def _make_bind(self, i):
        def bind(module, args):
            if not self._in_pass or self._streamed[self._pass_next] != i:
                raise RuntimeError(f"streamed layer {i} ran out of order (expected a pass over layers "
                                   f"{self._streamed[0]}..{self._streamed[-1]} through model.model)")
            watchers = list(self._acquire_watchers.values())
            for before, _ in watchers:
                before(i)
            start = time.perf_counter()
            # on CUDA the feed gives the layer's bytes on the device (uploaded earlier, or now)
            view = self._feed.begin(i) if self._feed is not None else self._acquire(i)
            self._held = i
            self.bind_wait_s += time.perf_counter() - start
            self._bind(i, view)
            for _, after in watchers:
                after(i)
        return bind

    def _acquire(self, i):
        return self._streamer.acquire(self._sid[i])

    def _make_release(self, i):
        def release(module, args, output):
            self._unbind(i)
            if self._held == i:
                self._held = None
                if self._feed is not None:  # layer i's kernels are launched: the next upload may start
                    following = self._pass_next + 1
                    self._feed.end(i, self._streamed[following] if following < len(self._streamed) else None)
                else:
                    self._streamer.release(self._sid[i])
                self._pass_next += 1
                self.bytes_read += self.index.layer_bytes(i)
                self.last_pass_bytes += self.index.layer_bytes(i)
        return release

    def _bind(self, i, view):
        converted = 0
        for k, (entry, (module, name, meta)) in enumerate(self._bindings[i]):
            t = view.tensor(k, entry.torch_dtype, entry.shape)
            if t.dtype != meta.dtype or (self._feed is None and t.device != self._device):
                t = t.to(device=self._device, dtype=meta.dtype)
                converted += t.nbytes
            module._parameters[name] = torch.nn.Parameter(t, requires_grad=False)
        tracked = self.memory_bytes + converted
        self.peak_tracked_bytes = max(self.peak_tracked_bytes, tracked)

    def _unbind(self, i):
        for _, (module, name, meta) in self._bindings[i]:
            module._parameters[name] = meta


def _layer_bindings(layer, index: WeightIndex, i: int) -> list:
    """[(entry, (owning module, parameter name, its meta Parameter))] in file order; checks coverage."""
    params = dict(layer.named_parameters())
    out, seen = [], set()
    for entry in sorted(index.layers[i], key=lambda t: (t.file_index, t.offset)):
        local = index.local_name(entry, i)
        if local not in params:
            raise ModelLoadError(f"{index.files[entry.file_index]}: {entry.name!r} matches no parameter of layer {i}")
        if tuple(params[local].shape) != entry.shape:
            raise ModelLoadError(f"{index.files[entry.file_index]}: {entry.name!r} has shape {list(entry.shape)}, "
                                 f"the model expects {list(params[local].shape)}")
        owner_name, _, name = local.rpartition(".")
        owner = layer.get_submodule(owner_name) if owner_name else layer
        out.append((entry, (owner, name, params[local])))
        seen.add(local)
    missing = sorted(set(params) - seen)
    if missing:
        raise ModelLoadError(f"{index.directory}: layer {i} has no weights for {missing}")
    return out


def _open_stamped(path, stamp) -> int:
    """A read-only descriptor on ``path``, checked to be the file that was indexed (``stamp``)."""
    fd = open_weight_file(path)
    st = os.fstat(fd)
    if not _same_file(st, stamp):
        os.close(fd)
        raise WeightFileError(f"{path}: changed on disk while the model was loading; load it again")
    return fd


def _same_file(st, stamp) -> bool:
    """``st`` (an fstat of the open descriptor) shows the bytes that were indexed as ``stamp``. Once the
    path points to another file (nlink 0: replaced or removed) the unlink itself moved the ctime."""
    now = stat_stamp(st)
    return now == stamp or (st.st_nlink == 0 and now[:4] == stamp[:4])


def checkpoint_dtype(index: WeightIndex):
    """The compute dtype from_pretrained(dtype="auto") would pick: config.json's dtype, else the first
    floating tensor's (each tensor is then cast to it, as HF casts a mixed-dtype checkpoint)."""
    configured = _config_dtype(index.directory)
    if configured is not None:
        return configured
    floats = [t.torch_dtype for t in index.layers[0] if t.torch_dtype.is_floating_point]
    return floats[0] if floats else torch.float32


def _config_dtype(directory: Path):
    import json

    try:
        config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") or {}):
        name = section.get("dtype") or section.get("torch_dtype")
        dtype = getattr(torch, str(name).replace("torch.", ""), None) if name else None
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            return dtype
    return None


def _check_placement(index: WeightIndex, placement: Placement) -> None:
    layers = sorted(placement.resident_layers + placement.streamed_layers)
    if layers != list(range(index.num_layers)):
        raise ValueError(f"placement covers layers {layers}, the checkpoint has 0..{index.num_layers - 1}")


def _build_on_meta(path: Path, dtype, device, attn_implementation, trust_remote_code=False):
    """The model with every parameter on meta and its non-persistent buffers computed on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot read config: {exc}") from exc
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    record = scheme_of(config)
    if record is not None:  # a quantized checkpoint: its linears are stored packed
        quantize_modules(model, record, dtype)
    # Same path as from_pretrained: non-persistent buffers (rotary inv_freq) are made real, then
    # filled by the model's own _init_weights, which on meta parameters does nothing.
    owners = set()
    for name, buf in model.named_non_persistent_buffers():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        owner._buffers[attr] = torch.empty_like(buf, device=device)
        owners.add(owner)
    with torch.no_grad():
        for owner in owners:
            model._init_weights(owner)
    _load_generation_config(model, path)
    return model.eval()


def _load_generation_config(model, path: Path) -> None:
    """The checkpoint's generation_config.json (EOS ids, sampling defaults), as from_pretrained reads
    it; from_config alone derives one from config.json, which may name other EOS ids."""
    from transformers import GenerationConfig

    if (path / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{path}: cannot read generation_config.json: {exc}") from exc


def _load_resident(model, index: WeightIndex, placement: Placement, dtype, device) -> None:
    """Load the placement's resident non-layer tensors and layers into memory the model owns (read, not
    mapped: a file changed later changes nothing in them); tie what the checkpoint leaves out or stores
    twice. Tensors read by rows stay on meta (their SparseRows binds them)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    sparse = set(placement.sparse_tensors)
    names = [t.name for t in index.non_layer if t.name not in sparse and t.name not in index.tied]
    names += [t.name for i in placement.resident_layers for t in index.layers[i]]
    # names matching no parameter (e.g. rotary inv_freq saved by old checkpoints) are skipped
    for name, value in iter_tensors(index, [n for n in names if n in params]):
        _set_parameter(model, name, value, params[name], device)
    _tie_missing(model, index, params, sparse)


def _set_parameter(model, name, value, meta, device):
    if tuple(value.shape) != tuple(meta.shape):
        raise ModelLoadError(f"{name!r}: checkpoint shape {list(value.shape)}, model expects {list(meta.shape)}")
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    owner._parameters[attr] = torch.nn.Parameter(value.to(device=device, dtype=meta.dtype), requires_grad=False)


def _tie_missing(model, index: WeightIndex, params, sparse=()) -> None:
    """Parameters still on meta outside the streamed layers and the row-read tensors must be tied aliases
    (the model's own ties, or a head the checkpoint stores with its embedding's bytes)."""
    tied = {**index.tied, **(getattr(model, "all_tied_weights_keys", None) or {})}
    layer_prefix = index.layer_prefix
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.device.type != "meta" or name.startswith(layer_prefix) or name in sparse:
            continue
        source = tied.get(name)
        if source is None or source not in index.tensors:
            raise ModelLoadError(f"{index.directory}: no weights for {name!r}")
        owner_name, _, attr = name.rpartition(".")
        model.get_submodule(owner_name)._parameters[attr] = model.get_parameter(source)
