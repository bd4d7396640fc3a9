"""Streamed layer bytes on a CUDA device: the GPU side of the streamed target.

Two paths, picked by ``gpu_path`` (see :func:`resolve_gpu_path`):

- ``"copy"`` (discrete GPUs): an :class:`UploadRing` of device slots (2 by default) filled from the
  streamer's pinned buffers by asynchronous H2D copies on a side stream. Layer i+1's upload is queued
  once layer i's kernels were launched, so it overlaps layer i's compute: from layer i's forward hook
  when i+1's host read has already finished (no wait), else from layer i+1's pre-hook, where the
  blocking host read happens inside the pipeline's compute gate (the draft drafts during it, as on the
  CPU). Events order everything: the side stream waits for the compute of the slot's previous user,
  the compute stream waits for the upload, and the host buffer goes back to the streamer once its copy
  has finished.
- ``"zero-copy"`` (integrated GPUs, Jetson: host memory *is* device memory): the pinned buffer is used
  in place through its device address (no second copy); it goes back to the streamer once the kernels
  of its layer have run.

The stream/event calls go through a small ``ops`` object (:class:`CudaOps`), so the bookkeeping is
unit-tested on the CPU with stub streams and events (tests/test_gpu_upload.py).

Part of llmcad.streaming: must not import llmcad.speculative, llmcad.models, llmcad.bench or the engine.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

GPU_PATHS = ("auto", "copy", "zero-copy")
DEVICE_SLOTS = 2  # the copy path's device buffers: one computing, one being filled


def device_integrated(device) -> bool:
    """True when CUDA ``device`` is integrated with host memory (cudaDeviceProp.integrated, Jetson)."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    flag = getattr(torch.cuda.get_device_properties(index), "is_integrated", None)
    if flag is None:  # older torch: ask the extension
        from llmcad._build import _ext

        flag = _ext().cuda_device_integrated(index)
    return bool(flag)


def resolve_gpu_path(gpu_path, device) -> str | None:
    """The path streamed layers take to ``device``: None (not CUDA: host tensors as they are),
    "copy" or "zero-copy". ``gpu_path``: "auto" (zero-copy on an integrated GPU, else copy), or forced."""
    if gpu_path not in GPU_PATHS:
        raise ValueError(f"gpu_path={gpu_path!r}: expected one of {', '.join(map(repr, GPU_PATHS))}")
    if torch.device(device).type != "cuda":
        return None
    if gpu_path == "auto":
        return "zero-copy" if device_integrated(device) else "copy"
    return gpu_path


class CudaOps:
    """The stream and event calls the ring makes (replaced by stubs in CPU tests)."""

    def __init__(self, device):
        self.device = torch.device(device)

    def new_stream(self):
        return torch.cuda.Stream(device=self.device)

    def new_event(self):
        return torch.cuda.Event()

    def current_stream(self):
        return torch.cuda.current_stream(self.device)

    def use_stream(self, stream):
        return torch.cuda.stream(stream)


class _DeviceBytes:
    """A device address exposed through __cuda_array_interface__ (keeps ``owner`` alive)."""

    def __init__(self, address: int, size: int, owner):
        self.owner = owner
        self.__cuda_array_interface__ = {"shape": (size,), "typestr": "|u1", "data": (address, False),
                                         "version": 3, "strides": None}


def zero_copy_bytes(view, device) -> torch.Tensor:
    """uint8 CUDA tensor over a pinned LayerView's bytes, in place (no copy); keeps ``view`` alive."""
    if not view.device_ptr:
        raise ValueError("gpu_path='zero-copy' needs pinned, mapped streamer buffers (streamer option "
                         "pinned='auto' or True with a CUDA device present); this buffer has no device address")
    size = int(view.array.nbytes)
    if size == 0:
        return torch.empty(0, dtype=torch.uint8, device=device)
    return torch.as_tensor(_DeviceBytes(view.device_ptr, size, view), device=device)


def typed_view(raw: torch.Tensor, offset: int, length: int, dtype, shape) -> torch.Tensor:
    """Range ``[offset, offset + length)`` of uint8 ``raw`` as ``dtype`` with ``shape``, zero-copy when the
    offset is aligned to the element size (else a copy on the same device)."""
    shape = tuple(int(s) for s in shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for s in shape:
        numel *= s
    if numel * itemsize != length:
        raise ValueError(f"range of {length} bytes cannot hold shape {shape} of {dtype}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype, device=raw.device)
    chunk = raw[offset: offset + length]
    if (raw.storage_offset() + offset) % itemsize:
        chunk = chunk.clone()
    return chunk.view(dtype).view(shape)


@dataclass
class _Slot:
    buffer: torch.Tensor  # uint8 [slot_bytes] on the device
    key: object = None  # the layer it holds (None: free to overwrite once `free` has fired)
    size: int = 0
    ready: object = None  # event: its upload finished (side stream)
    free: object = None  # event: the last compute reading it finished (compute stream)


class UploadRing:
    """``num_slots`` device buffers of ``slot_bytes``, filled round-robin on a side stream.

    Order of calls per layer: :meth:`upload` (side stream) -> :meth:`take` (compute stream waits for the
    upload; returns the bytes) -> :meth:`done` after the layer's kernels were launched. ``on_copied``
    callbacks (host buffer release) run from :meth:`poll`/:meth:`drain` once their copy has finished.
    """

    def __init__(self, slot_bytes: int, device, num_slots: int = DEVICE_SLOTS, ops=None):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.ops = ops or CudaOps(device)
        self.slot_bytes = int(slot_bytes)
        self.slots = [_Slot(torch.empty(self.slot_bytes, dtype=torch.uint8, device=device)) for _ in range(num_slots)]
        self.side = self.ops.new_stream()
        self._next = 0  # slot of the next upload
        self._copies = deque()  # (event, on_copied) host buffers still read by a copy, oldest first
        self.uploads = 0
        self.bytes_uploaded = 0

    @property
    def device_bytes(self) -> int:
        return self.slot_bytes * len(self.slots)

    @property
    def copies_in_flight(self) -> int:
        return len(self._copies)

    def holds(self, key) -> bool:
        return any(s.key == key for s in self.slots if s.key is not None)

    def upload(self, key, host: torch.Tensor, on_copied=None) -> None:
        """Queue the copy of uint8 CPU tensor ``host`` (pinned: truly asynchronous) into the next slot."""
        size = host.numel()
        if size > self.slot_bytes:
            raise ValueError(f"layer {key!r} has {size} bytes, a device slot {self.slot_bytes}")
        slot = self.slots[self._next]
        if slot.key is not None:
            raise RuntimeError(f"device slot {self._next} still holds layer {slot.key!r} (done() not called)")
        self._next = (self._next + 1) % len(self.slots)
        if slot.free is not None:
            self.side.wait_event(slot.free)  # the slot's previous layer has finished computing
        ready = self.ops.new_event()
        with self.ops.use_stream(self.side):
            if size:
                slot.buffer[:size].copy_(host, non_blocking=True)
            ready.record(self.side)
        slot.key, slot.size, slot.ready, slot.free = key, size, ready, None
        self.uploads += 1
        self.bytes_uploaded += size
        self._copies.append((ready, on_copied))
        self.poll()

    def take(self, key) -> torch.Tensor:
        """The device bytes of ``key``: uint8 [size]; the compute stream waits for their upload first."""
        slot = self._slot(key)
        self.ops.current_stream().wait_event(slot.ready)
        return slot.buffer[: slot.size]

    def done(self, key) -> None:
        """Call after ``key``'s kernels were launched: the slot is reused once they have run."""
        slot = self._slot(key)
        free = self.ops.new_event()
        free.record(self.ops.current_stream())
        slot.key, slot.free = None, free
        self.poll()

    def poll(self) -> None:
        """Run the callbacks of the copies that have finished (in order)."""
        while self._copies and self._copies[0][0].query():
            _, on_copied = self._copies.popleft()
            if on_copied is not None:
                on_copied()

    def drain(self) -> None:
        """Wait for every copy in flight and run its callback."""
        while self._copies:
            self.wait_oldest()

    def wait_oldest(self) -> None:
        """Wait for the oldest copy in flight (a host buffer is needed back) and run its callback."""
        if self._copies:
            event, on_copied = self._copies.popleft()
            event.synchronize()
            if on_copied is not None:
                on_copied()

    def _slot(self, key) -> _Slot:
        for slot in self.slots:
            if slot.key is not None and slot.key == key:
                return slot
        raise KeyError(f"no device slot holds layer {key!r}")

    def reset(self) -> None:
        """After a failed pass: wait for all device work on the slots; forget layers and callbacks."""
        self.side.synchronize()
        self.ops.current_stream().synchronize()
        self._copies.clear()
        for slot in self.slots:
            slot.key, slot.ready, slot.free = None, None, None
        self._next = 0


class LayerBytes:
    """A streamed layer's bytes on the device and where each tensor range starts in them."""

    def __init__(self, raw: torch.Tensor, offsets, lengths):
        self.raw, self.offsets, self.lengths = raw, list(offsets), list(lengths)

    def tensor(self, index: int, dtype, shape) -> torch.Tensor:
        return typed_view(self.raw, self.offsets[index], self.lengths[index], dtype, shape)


class DeviceFeed:
    """Streamed layers' bytes on a CUDA device for the streamed target's hooks.

    ``acquire(layer) -> LayerView`` and ``release(layer)`` are the host ring's (in prefetch order);
    ``read_ready() -> bool``: whether the next acquire would return without waiting for its read.
    ``host_buffers`` is the host ring's size: at most that many layers are held on the host at once, so
    a feed never asks for a buffer the ring cannot give. Per layer: :meth:`begin` in its forward
    pre-hook (returns :class:`LayerBytes`; the only place a feed waits for a host read), :meth:`end` in
    its forward hook, naming the next layer of the pass (its upload starts there when that needs no
    wait, "copy"); :meth:`finish_pass` after a complete pass, :meth:`reset` after a failed one.
    """

    def __init__(self, mode: str, device, *, acquire, release, host_buffers: int, slot_bytes: int = 0,
                 num_slots: int = DEVICE_SLOTS, ops=None, read_ready=None):
        if mode not in ("copy", "zero-copy"):
            raise ValueError(f"mode must be 'copy' or 'zero-copy', got {mode!r}")
        self.mode, self.device = mode, torch.device(device)
        self.ops = ops or CudaOps(device)
        self._acquire, self._release = acquire, release
        self._read_ready = read_ready or (lambda: False)
        self.host_buffers = int(host_buffers)
        self.early_uploads = 0  # copy: uploads queued from the previous layer's hook (no wait)
        self.ring = UploadRing(slot_bytes, device, num_slots, ops=self.ops) if mode == "copy" else None
        self._layout = {}  # layer -> (offsets, lengths) of its uploaded bytes
        self._in_use = deque()  # zero-copy: (event after the layer's compute, layer) still read by kernels

    @property
    def device_bytes(self) -> int:
        """Device memory the feed holds (the copy ring's slots)."""
        return self.ring.device_bytes if self.ring is not None else 0

    def host_held(self) -> int:
        """Host buffers the feed still holds (released once their copy / compute has finished)."""
        return self.ring.copies_in_flight if self.ring is not None else len(self._in_use)

    def uploaded(self, layer) -> bool:
        """True when ``layer``'s bytes are (being) uploaded: its begin() will not wait for a read."""
        return self.ring is not None and self.ring.holds(layer)

    def stats(self) -> dict:
        out = {"gpu_path": self.mode, "device_bytes": self.device_bytes, "host_held": self.host_held()}
        if self.ring is not None:
            out.update(uploads=self.ring.uploads, bytes_uploaded=self.ring.bytes_uploaded,
                       early_uploads=self.early_uploads)
        return out

    def begin(self, layer) -> LayerBytes:
        if self.ring is not None:
            if not self.ring.holds(layer):
                self._upload(layer)
            offsets, lengths = self._layout.pop(layer)
            return LayerBytes(self.ring.take(layer), offsets, lengths)
        self._make_host_room()
        view = self._acquire(layer)
        return LayerBytes(zero_copy_bytes(view, self.device), view.offsets, view.lengths)

    def end(self, layer, next_layer=None) -> None:
        """After ``layer``'s kernels were launched; ``next_layer``: the pass's next streamed layer or None.
        Copy: ``next_layer``'s upload is queued here only if that waits for nothing (its host read has
        finished and a host buffer is free); otherwise its :meth:`begin` does it, inside the gate."""
        if self.ring is not None:
            self.ring.done(layer)
            if next_layer is not None and not self.ring.holds(next_layer) and self._read_ready():
                self.ring.poll()
                if self.ring.copies_in_flight < self.host_buffers:
                    self._upload(next_layer)
                    self.early_uploads += 1
            return
        event = self.ops.new_event()
        event.record(self.ops.current_stream())
        self._in_use.append((event, layer))
        while self._in_use and self._in_use[0][0].query():
            self._release(self._in_use.popleft()[1])

    def finish_pass(self) -> None:
        """Give every host buffer back (waits for the last copies / the last layer's compute)."""
        if self.ring is not None:
            self.ring.drain()
        while self._in_use:
            event, layer = self._in_use.popleft()
            event.synchronize()
            self._release(layer)

    def reset(self) -> None:
        """After a failed pass: wait for the device, forget held buffers (the host ring resets itself)."""
        if self.ring is not None:
            self.ring.reset()
        else:
            self.ops.current_stream().synchronize()
        self._in_use.clear()
        self._layout.clear()

    def _upload(self, layer) -> None:
        self._make_host_room()
        view = self._acquire(layer)
        self._layout[layer] = (view.offsets, view.lengths)
        host = torch.from_numpy(view.array)
        # the callback holds the view: its buffer stays alive until the copy has finished
        self.ring.upload(layer, host, on_copied=lambda view=view: self._release(layer))

    def _make_host_room(self) -> None:
        """Before an acquire: keep fewer than ``host_buffers`` layers held, waiting for the oldest."""
        if self.ring is not None:
            self.ring.poll()
            while self.ring.copies_in_flight >= self.host_buffers:
                self.ring.wait_oldest()
            return
        while len(self._in_use) >= self.host_buffers:
            event, layer = self._in_use.popleft()
            event.synchronize()
            self._release(layer)
