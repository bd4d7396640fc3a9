"""Sparse embedding reads: a pass reads only the rows of its tokens from storage, not the whole table.

An input embedding of V rows is used per pass only at the tree's few hundred token ids, so the table
stays on storage. :class:`SparseRows` hooks the model's embedding module (any ``nn.Embedding``
subclass: scaled embeddings keep their own forward): before the module runs, the pass's distinct ids
are read (one ``pread`` per run of consecutive ids, or from a small cache of recent rows), converted
to the compute dtype and bound as a [U, hidden] weight, and the ids are renumbered into it; after,
a stand-in [V, hidden] weight of one row's storage (stride 0) is put back, so ``weight.shape``,
``.dtype`` and ``.device`` still describe the table. A gather of converted rows equals the rows of
the converted table, so logits are bit-identical to the resident model's.

Part of llmcad.streaming: must not import llmcad.speculative, llmcad.models, llmcad.bench or the engine.
"""
from __future__ import annotations

import os
from collections import OrderedDict

import torch

from llmcad.errors import WeightFileError
from llmcad.streaming.weights import TensorEntry

DEFAULT_CACHE_ROWS = 1024  # rows kept after a pass (the next tree reuses many of its tokens)


def row_bytes(entry: TensorEntry) -> int:
    """Bytes of one row of a 2-D tensor as stored."""
    return entry.length // entry.shape[0] if entry.shape[0] else 0


def cache_bytes(entry: TensorEntry, dtype, cache_rows: int = DEFAULT_CACHE_ROWS) -> int:
    """Memory the row cache of ``entry`` may hold: ``cache_rows`` rows in ``dtype`` (the file's when None)."""
    itemsize = entry.torch_dtype.itemsize if dtype is None else dtype.itemsize
    return min(cache_rows, entry.shape[0]) * entry.shape[1] * itemsize


class SparseRows:
    """Serves ``module``'s weight (stored as ``entry`` in the file open as ``fd``) row by row per call.

    ``dtype``/``device``: what the rows are converted to (the model's parameter dtype and device).
    Counters: ``bytes_read`` (cumulative payload bytes read from storage), ``rows_read``, ``hits``.
    """

    def __init__(self, module: torch.nn.Module, entry: TensorEntry, fd: int, path, *, dtype, device,
                 cache_rows: int = DEFAULT_CACHE_ROWS):
        if len(entry.shape) != 2:
            raise WeightFileError(f"{path}: {entry.name!r} has shape {list(entry.shape)}; sparse rows need 2-D")
        self.entry, self.path, self.fd = entry, path, fd
        self.dtype, self.device = dtype, torch.device(device)
        self.rows, self.width = entry.shape
        self.row_bytes = row_bytes(entry)
        self.cache_rows = cache_rows
        self._cache: OrderedDict = OrderedDict()  # id -> [width] row in ``dtype`` on the CPU, most recent last
        self.bytes_read = 0
        self.rows_read = 0
        self.hits = 0
        self._module = module
        self._padding_idx = getattr(module, "padding_idx", None)
        self._stand_in = torch.nn.Parameter(torch.zeros(1, self.width, dtype=dtype, device=self.device)
                                            .expand(self.rows, self.width), requires_grad=False)
        module._parameters["weight"] = self._stand_in
        self._hooks = [module.register_forward_pre_hook(self._bind, with_kwargs=True),
                       module.register_forward_hook(self._unbind, always_call=True)]

    @property
    def memory_bytes(self) -> int:
        """Rows held in the cache."""
        return len(self._cache) * self.width * self.dtype.itemsize

    def remove(self) -> None:
        """Stop serving rows (the module keeps its stand-in: a later call fails, it never reads the file)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._cache.clear()

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (any shape, int) as [*ids.shape, width] in ``dtype`` (test and reference use)."""
        unique, inverse = torch.unique(ids.reshape(-1).cpu(), sorted=True, return_inverse=True)
        return self._rows(unique)[inverse].reshape(*ids.shape, self.width)

    # ---- hooks ----
    def _bind(self, module, args, kwargs):
        ids = args[0] if args else kwargs.pop("input")
        unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        rows = self._rows(unique.cpu())
        module._parameters["weight"] = torch.nn.Parameter(rows.to(self.device, non_blocking=True),
                                                          requires_grad=False)
        # padding_idx only shapes gradients, and it indexes the whole table: not the rows bound here
        self._padding_idx, module.padding_idx = getattr(module, "padding_idx", None), None
        return (inverse.view(ids.shape), *args[1:]), kwargs

    def _unbind(self, module, args, output):
        module._parameters["weight"] = self._stand_in
        module.padding_idx = self._padding_idx

    # ---- reading ----
    def _rows(self, unique: torch.Tensor) -> torch.Tensor:
        """[len(unique), width] in ``dtype`` on the CPU; ``unique`` sorted, distinct."""
        ids = unique.tolist()
        if ids and (ids[0] < 0 or ids[-1] >= self.rows):
            bad = ids[0] if ids[0] < 0 else ids[-1]
            raise IndexError(f"token id {bad} is out of range for the embedding of {self.rows} rows")
        out = torch.empty(len(ids), self.width, dtype=self.dtype)
        missing = []
        for k, i in enumerate(ids):
            row = self._cache.get(i)
            if row is None:
                missing.append(k)
            else:
                self._cache.move_to_end(i)
                out[k] = row
        self.hits += len(ids) - len(missing)
        position = {ids[k]: k for k in missing}
        for start, stop in _runs([ids[k] for k in missing]):
            block = self._read(start, stop).to(self.dtype)
            out[[position[i] for i in range(start, stop)]] = block
            for i in range(start, stop):
                self._remember(i, block[i - start])
        return out

    def _read(self, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1 as stored: [stop - start, width] in the file's dtype."""
        n = (stop - start) * self.row_bytes
        raw = torch.empty(n, dtype=torch.uint8)
        view, done, offset = memoryview(raw.numpy()), 0, self.entry.offset + start * self.row_bytes
        while done < n:
            try:
                got = os.preadv(self.fd, [view[done:]], offset + done)
            except OSError as exc:
                raise WeightFileError(f"{self.path}: reading rows of {self.entry.name!r} failed: "
                                      f"{exc.strerror}") from None
            if got == 0:
                raise WeightFileError(f"{self.path}: truncated while reading rows of {self.entry.name!r}")
            done += got
        self.bytes_read += n
        self.rows_read += stop - start
        return raw.view(self.entry.torch_dtype).reshape(stop - start, self.width)

    def _remember(self, i: int, row: torch.Tensor) -> None:
        if self.cache_rows <= 0:
            return
        self._cache[i] = row.clone()
        if len(self._cache) > self.cache_rows:
            self._cache.popitem(last=False)


def _runs(ids: list) -> list:
    """[(start, stop)] covering sorted distinct ``ids`` with runs of consecutive values."""
    runs = []
    for i in ids:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [tuple(r) for r in runs]
