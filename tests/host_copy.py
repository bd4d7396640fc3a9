"""A spy on every device-to-host transfer, for tests that must prove data stays on the device.

Every way a tensor's values reach the host goes through one of a few aten operators, whatever the
Python spelling: ``.cpu()``, ``.to("cpu")``, ``.numpy()`` after them, ``.tolist()`` and
``copy_`` into a host tensor end in ``_to_copy`` or ``copy_``; ``.item()``, ``int()``, ``float()``
and ``bool()`` end in ``_local_scalar_dense``; ``torch.equal`` returns a host bool from ``equal``.
A ``TorchDispatchMode`` sees each of them, including those called from C++.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_COPIES = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default, aten._copy_from_and_resize.default}
_SYNCS = {aten._local_scalar_dense.default: "item", aten.equal.default: "equal", aten.is_nonzero.default: "bool"}


class HostCopySpy(TorchDispatchMode):
    """Records ``(kind, shape)`` for every transfer of a ``device_type`` tensor's values to the host.

    ``transfers``: all of them; ``big``: those of a tensor whose last dimension has ``min_cols`` or
    more elements (e.g. full logits rows). Use as a context manager around the code under test; like
    every dispatch mode it sees the thread that entered it (not a pipeline's verification worker).
    """

    def __init__(self, device_type: str = "cuda", min_cols: int = 1):
        super().__init__()
        self.device_type, self.min_cols = device_type, min_cols
        self.transfers: list = []

    @property
    def big(self) -> list:
        return [t for t in self.transfers if t[1] and t[1][-1] >= self.min_cols]

    def clear(self) -> None:
        self.transfers.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        source = self._device_source(func, args, kwargs)
        if source is not None:
            kind = _SYNCS.get(func, "copy")
            self.transfers.append((kind, tuple(source.shape)))
        return func(*args, **kwargs)

    def _device_source(self, func, args, kwargs):
        """The device tensor whose values this call brings to the host, or None."""
        if func in _SYNCS:
            return next((a for a in args if self._on_device(a)), None)
        if func not in _COPIES:
            return None
        if func == aten._to_copy.default:
            src, dst_device = args[0], kwargs.get("device")
            goes_to_host = dst_device is not None and torch.device(dst_device).type == "cpu"
            return src if goes_to_host and self._on_device(src) else None
        dst, src = (args[0], args[1]) if func == aten.copy_.default else (args[1], args[0])
        return src if self._on_device(src) and isinstance(dst, torch.Tensor) and dst.device.type == "cpu" else None

    def _on_device(self, value) -> bool:
        return isinstance(value, torch.Tensor) and value.device.type == self.device_type
