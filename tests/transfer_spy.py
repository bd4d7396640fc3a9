"""Counting device-to-host transfers (and the host syncs they imply) in a piece of code.

:class:`TransferSpy` is a torch function mode: it sees every torch call made inside it. A transfer is
one of TRANSFER_CALLS on a *device tensor*: with ``device="cuda"``, any CUDA tensor (plus ``.to`` /
``copy_`` onto the CPU); on the CPU, where every tensor is a host tensor, the device tensors are the
ones a GPU run would keep on the device: the models' parameters and buffers (``sources``) and
everything computed from them (taint). Host data turned into tensors stays untainted, like host data
uploaded on a GPU, and a transfer's result is host data again.
"""
from __future__ import annotations

import traceback
import weakref
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

TRANSFER_CALLS = {"cpu", "numpy", "tolist", "item", "__int__", "__float__", "__bool__", "__index__",
                  "__array__", "equal", "allclose", "nonzero", "__format__", "__repr__"}
_IN_PLACE_EXTRA = {"__setitem__", "index_put_", "copy_"}


def _tensors(obj) -> list:
    return [x for x in tree_flatten(obj)[0] if isinstance(x, torch.Tensor)]


class TransferSpy(TorchFunctionMode):
    def __init__(self, device: str = "cpu", sources=()):
        super().__init__()
        self.device = device
        self._tainted = {}  # id -> weakref (tensors compare elementwise, so no WeakSet)
        for module in sources:
            self.taint_module(module)
        self.calls = Counter()  # (call name, caller "file:line") -> count
        self.largest = Counter()  # (call name, caller) -> most elements one such transfer moved
        self.enabled = True

    def taint_module(self, module) -> None:
        for t in list(module.parameters()) + list(module.buffers()):
            self._taint(t)

    def _taint(self, t) -> None:
        self._tainted[id(t)] = weakref.ref(t)

    @property
    def count(self) -> int:
        return sum(self.calls.values())

    def reset(self) -> None:
        self.calls.clear()

    def _on_device(self, t) -> bool:
        if self.device == "cuda":
            return t.is_cuda
        ref = self._tainted.get(id(t))
        return ref is not None and ref() is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        inputs = _tensors((args, kwargs))
        device_input = any(self._on_device(t) for t in inputs)
        if self.enabled and device_input and self._is_transfer(name, args, kwargs):
            key = (name, _caller())
            self.calls[key] += 1
            self.largest[key] = max(self.largest[key], max(t.numel() for t in inputs))
            out = func(*args, **kwargs)
            for t in _tensors(out):  # host data now (on the CPU, .cpu() returns the tensor itself)
                self._tainted.pop(id(t), None)
            return out
        out = func(*args, **kwargs)
        if device_input and self.device != "cuda":
            for t in _tensors(out):
                self._taint(t)
            if name.endswith("_") or name in _IN_PLACE_EXTRA:
                for t in inputs:
                    self._taint(t)
        return out

    def _is_transfer(self, name, args, kwargs) -> bool:
        if name in TRANSFER_CALLS:
            return True
        if self.device == "cuda" and name == "to":
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            return target is not None and not isinstance(target, torch.dtype) and torch.device(target).type == "cpu"
        if self.device == "cuda" and name == "copy_":
            return not args[0].is_cuda
        return False


def _caller() -> str:
    """The innermost frame outside torch and this file: where the transfer was asked for."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and not frame.filename.endswith("transfer_spy.py"):
            return f"{frame.filename.rsplit('/', 2)[-2]}/{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} {frame.name}"
    return "?"
