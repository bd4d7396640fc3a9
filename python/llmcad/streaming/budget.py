"""Placement of the target under a memory budget: which layers stay resident, how big the ring is.

``memory_budget`` bounds everything llmcad holds for the models: the draft's weights, the target's
resident tensors (non-layer tensors plus the first k layers), the streamer's buffers, the scratch
for a converted layer (when the compute dtype differs from the file's), and both KV caches.
Spare budget pins target layers resident from the first one on, so they are never re-read.

Part of llmcad.streaming: must not import llmcad.speculative, llmcad.models, llmcad.bench or the engine.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from llmcad.errors import BudgetError
from llmcad.streaming import streamer
from llmcad.streaming.weights import ITEMSIZE, WeightIndex
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(value, what: str = "memory_budget") -> int:
    """Bytes from ``2GiB``, ``1.5GB``, ``800MiB``, ``"123"`` or an int. Anything else -> BudgetError."""
    if isinstance(value, bool):
        raise BudgetError(f"{what}={value!r}: expected a size such as '2GiB', '1.5GB', '800MiB' or bytes")
    if isinstance(value, int):
        nbytes = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)) and m[2].lower() in _UNITS:
        nbytes = int(min(float(m[1]) * _UNITS[m[2].lower()], 2.0 ** 63))  # inf: too large, not OverflowError
    else:
        raise BudgetError(f"{what}={value!r}: expected a size such as '2GiB', '1.5GB', '800MiB' or bytes")
    if not 0 < nbytes < 2 ** 63:
        raise BudgetError(f"{what}={value!r}: must be a positive size below 2**63 bytes (8 EiB)")
    return nbytes


def format_size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


@dataclass
class Placement:
    """Where each target layer lives, and the budget's accounting in bytes."""

    resident_layers: list
    streamed_layers: list
    buffer_bytes: int  # WeightStreamer(buffer_bytes=...): largest streamed layer (0 when none)
    num_buffers: int
    bytes_per_pass: int  # payload bytes read from storage per target pass
    budget_bytes: int | None
    accounting: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> dict:
        """Short form for stats and ``--json``: counts instead of layer lists."""
        return {"resident_layers": len(self.resident_layers), "streamed_layers": len(self.streamed_layers),
                "bytes_per_pass": self.bytes_per_pass, "buffer_bytes": self.buffer_bytes,
                "num_buffers": self.num_buffers, "budget_bytes": self.budget_bytes,
                "accounted_bytes": self.accounting.get("total", 0)}


def ring_buffer_bytes(index: WeightIndex, layers) -> int:
    """``buffer_bytes`` for WeightStreamer: the smallest that holds every one of ``layers`` as the
    streamer lays it out (the C++ streamer computes it, so a plan that fits here fits there)."""
    files = len(index.files)
    return max((streamer.buffer_bytes_for(index.layer_ranges(i).ranges, files) for i in layers), default=0)


def streamer_memory_bytes(buffer_bytes: int, num_buffers: int, num_files: int) -> int:
    """Memory WeightStreamer allocates for this ring (computed by the C++ streamer)."""
    return streamer.memory_bytes(buffer_bytes, num_buffers, num_files)


def kv_cache_bytes(config, tokens: int, dtype) -> int:
    """Bytes of a full KV cache (keys and values, every layer) holding ``tokens`` positions."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * tokens * _itemsize(dtype)


def module_bytes(module) -> int:
    """Bytes of a module's parameters and buffers, counting shared storage once."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type == "meta":
            continue
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def plan_placement(index: WeightIndex, *, memory_budget, dtype=None, draft_bytes: int = 0,
                   kv_bytes: int = 0, num_buffers: int = 2, max_resident_layers: int | None = None,
                   device_slots: int = 0) -> Placement:
    """Pin as many leading target layers as ``memory_budget`` allows; stream the rest.

    ``dtype``: compute dtype (None keeps the file's). ``draft_bytes``: the draft's weights.
    ``kv_bytes``: both KV caches at their largest (see :func:`kv_cache_bytes`).
    ``device_slots``: device buffers of the largest streamed layer each (a discrete GPU's upload ring,
    llmcad.streaming.gpu_upload; 0 on the CPU and for zero-copy).
    ``max_resident_layers``: pin at most this many layers even when more would fit (benchmarks, tests).
    Raises BudgetError when even k=0 (draft, non-layer tensors, ``num_buffers`` buffers) does not fit.
    """
    if num_buffers < 1:
        raise BudgetError(f"num_buffers={num_buffers}: the ring needs at least 1 buffer")
    budget = parse_size(memory_budget)
    top = index.num_layers if max_resident_layers is None else max(0, min(max_resident_layers, index.num_layers))
    for k in range(top, -1, -1):
        acct = _account(index, k, dtype, draft_bytes, kv_bytes, num_buffers, device_slots)
        if acct["total"] <= budget:
            return _placement(index, k, acct, budget, num_buffers)
    raise BudgetError(
        f"memory_budget={format_size(budget)} ({budget} bytes) is too small: needs at least "
        f"{format_size(acct['total'])} ({acct['total']} bytes) for the draft weights "
        f"({format_size(draft_bytes)}), the target's non-layer tensors ({format_size(acct['target_non_layer'])}), "
        f"{num_buffers} layer buffers ({format_size(acct['streamer_buffers'])}), {device_slots} device "
        f"slots ({format_size(acct['device_ring'])}) and the KV caches "
        f"({format_size(kv_bytes)})")


def resident_placement(index: WeightIndex) -> Placement:
    """Every layer resident (memory_budget=None)."""
    acct = _account(index, index.num_layers, None, 0, 0, 0)
    return _placement(index, index.num_layers, acct, None, 0)


def _account(index, k, dtype, draft_bytes, kv_bytes, num_buffers, device_slots=0) -> dict:
    """Byte accounting with the first k layers resident."""
    streamed = range(k, index.num_layers)
    buffer = ring_buffer_bytes(index, streamed)
    converts = dtype is not None and any(_converted(t, dtype) for i in streamed for t in index.layers[i])
    acct = {
        "draft_weights": draft_bytes,
        "target_non_layer": sum(_compute_bytes(t, dtype) for t in index.non_layer),
        "target_resident_layers": sum(_compute_bytes(t, dtype) for i in range(k) for t in index.layers[i]),
        "streamer_buffers": streamer_memory_bytes(buffer, num_buffers, len(index.files)) if streamed else 0,
        "conversion_scratch": max((sum(_compute_bytes(t, dtype) for t in index.layers[i]) for i in streamed),
                                  default=0) if converts else 0,
        "kv_caches": kv_bytes,
        # a device slot holds a layer as the streamer lays it out (llmcad.streaming.gpu_upload)
        "device_ring": device_slots * max((streamer.layout_bytes(index.layer_ranges(i).ranges) for i in streamed),
                                          default=0) if device_slots else 0,
    }
    acct["total"] = sum(acct.values())
    return acct


def _placement(index, k, acct, budget, num_buffers) -> Placement:
    streamed = list(range(k, index.num_layers))
    buffer = ring_buffer_bytes(index, streamed)
    if budget is not None:
        acct = dict(acct, spare=budget - acct["total"])
    return Placement(resident_layers=list(range(k)), streamed_layers=streamed, buffer_bytes=buffer,
                     num_buffers=num_buffers if streamed else 0,
                     bytes_per_pass=sum(index.layer_bytes(i) for i in streamed),
                     budget_bytes=budget, accounting=acct)


def _itemsize(dtype) -> int:
    if isinstance(dtype, str):
        import torch

        dtype = getattr(torch, dtype)
    return dtype.itemsize


def _compute_bytes(entry, dtype) -> int:
    """Bytes of a tensor once held in the compute dtype."""
    if dtype is None or not _is_float(entry.dtype):
        return entry.length
    return entry.length // ITEMSIZE[entry.dtype] * _itemsize(dtype)


def _converted(entry, dtype) -> bool:
    return _is_float(entry.dtype) and entry.torch_dtype != _as_dtype(dtype)


def _is_float(code: str) -> bool:
    return code in ("F64", "F32", "F16", "BF16")


def _as_dtype(dtype):
    import torch

    return getattr(torch, dtype) if isinstance(dtype, str) else dtype
