"""Placement of the target under a memory budget: which layers stay resident, how big the ring is.

``memory_budget`` bounds the peak resident memory of the whole process (VmHWM): the runtime (Python,
torch, transformers, the tokenizer: its floor measured before the weights load, plus
:data:`RUNTIME_SLACK` for what it grows by once passes run and for allocator slack), the draft's
weights, the target's resident tensors (non-layer tensors plus the first k layers), the streamer's
buffers, the scratch for a converted layer (when the compute dtype differs from the file's), both
KV caches, and the working set of the largest pass the engine may run (``pass_rows`` rows: both
models' activations and their logits, computed in chunks of rows; see :func:`pass_work_bytes`).
The plan reserves the largest ``pass_rows`` in :data:`PASS_ROWS` that fits with no layer resident.

What stays resident is chosen to minimise the bytes read per pass. A pass reads every byte of a
streamed layer but only its tokens' rows of the input embedding, so the embedding table is read
sparsely (llmcad.streaming.sparse: a small cache of recent rows is what it holds) unless everything,
table included, fits; the budget it frees pins layers. A tied lm_head is the embedding: it is held
once, resident (every row is needed per pass), and serves the embedding's rows. Spare budget pins
target layers resident, so they are never re-read, spread evenly among the streamed ones
(:func:`spread_layers`): a resident layer computes while the reader fills the buffer the streamed layer
before it freed, so its compute hides behind the reads instead of leaving the storage idle.

Part of llmcad.streaming: must not import llmcad.speculative, llmcad.models, llmcad.bench or the engine.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from llmcad import memory
from llmcad.errors import BudgetError
from llmcad.streaming import streamer
from llmcad.streaming.sparse import cache_bytes as row_cache_bytes
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


_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?(?:e[+-]?\d+)?|\.\d+(?:e[+-]?\d+)?)\s*([a-z]*)\s*(/\s*s)?\s*$", re.IGNORECASE)


def parse_rate(value, what: str = "bandwidth") -> float:
    """Bytes/s from ``300MB/s``, ``1.4GB/s``, ``300MiB/s`` (units as :func:`parse_size`), ``300e6`` or a
    number; at least 1 byte/s. Anything else -> BudgetError."""
    m = _RATE_RE.match(value) if isinstance(value, str) else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        rate = float(value)
    elif m and m[2].lower() in _UNITS:
        rate = float(m[1]) * _UNITS[m[2].lower()]
    else:
        raise BudgetError(f"{what}={value!r}: expected a rate such as '300MB/s', '1.4GB/s', '300MiB/s' or bytes/s")
    if not rate >= 1 or rate == float("inf"):
        raise BudgetError(f"{what}={value!r}: must be at least 1 byte/s")
    return rate


_PAGE = 4096
AUTO_MARGIN = (0.05, 128 * 2**20)  # "auto" leaves 5% of the memory it finds, and at least 128 MiB, to the rest


def resolve_budget(value) -> tuple[int, str]:
    """``(bytes, where they came from)`` of a memory budget: a size (see :func:`parse_size`) or
    ``"auto"``: this process's memory cgroup limit when it has one (v1 ``memory.limit_in_bytes``, v2
    ``memory.max``), else ``MemAvailable`` plus what this process already holds, less
    :data:`AUTO_MARGIN`. A size above the cgroup limit is refused: the kernel would kill the process
    there, whatever the plan."""
    limit = memory.cgroup_memory_limit()
    if isinstance(value, str) and value.strip().lower() == "auto":
        if limit is not None:
            found, source = limit, f"the memory cgroup's limit {format_size(limit)}"
        else:
            available = memory.mem_available_bytes()
            if available is None:
                raise BudgetError("memory_budget='auto': this system reports neither a memory cgroup limit nor "
                                  "MemAvailable; give a size such as '2GiB'")
            held = memory.rss_bytes() or 0
            found = available + held
            source = f"MemAvailable {format_size(available)} + {format_size(held)} this process holds"
        fraction, least = AUTO_MARGIN
        margin = max(int(found * fraction), least)
        if found - margin <= 0:
            raise BudgetError(f"memory_budget='auto': {source} leaves nothing after the {format_size(margin)} "
                              "margin")
        return found - margin, f"auto: {source}, less a {format_size(margin)} margin"
    nbytes = parse_size(value)
    if limit is not None and nbytes >= limit + _PAGE:  # the kernel keeps a limit in whole pages
        raise BudgetError(f"memory_budget={format_size(nbytes)} is above this process's memory cgroup limit "
                          f"({format_size(limit)}): the kernel would kill it there; give at most that, or 'auto'")
    available = memory.mem_available_bytes()
    if available is not None and nbytes > available + (memory.rss_bytes() or 0):
        import warnings

        warnings.warn(f"memory_budget={format_size(nbytes)} is more than this machine has free "
                      f"(MemAvailable {format_size(available)} plus what this process holds): the plan may not "
                      "fit; 'auto' sizes the budget to what is free", ResourceWarning, stacklevel=2)
    return nbytes, "given"


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
    sparse_tensors: list = field(default_factory=list)  # read row by row per pass (the input embedding)
    resident_tensors: list = field(default_factory=list)  # non-layer tensors held in memory
    pass_rows: int | None = None  # rows the largest pass may run (tree nodes + prompt tokens); None: unbounded

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> dict:
        """Short form for stats and ``--json``: counts instead of layer lists; non-layer tensors by name."""
        return {"resident_layers": len(self.resident_layers), "streamed_layers": len(self.streamed_layers),
                "resident_tensors": list(self.resident_tensors), "sparse_tensors": list(self.sparse_tensors),
                "bytes_per_pass": self.bytes_per_pass, "buffer_bytes": self.buffer_bytes,
                "num_buffers": self.num_buffers, "budget_bytes": self.budget_bytes,
                "accounted_bytes": self.accounting.get("total", 0), "pass_rows": self.pass_rows,
                "runtime_floor_bytes": self.accounting.get("runtime_floor", 0)}


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


def activation_bytes(config, rows: int, context: int, dtype) -> int:
    """Working memory of one decoder pass of ``rows`` query rows over ``context`` cached positions
    (hidden states, q/k/v, keys and values expanded to every head, the additive mask, the MLP's
    intermediates, one layer's cache as it grows), with a quarter more for what a kernel allocates
    beside them. Eager attention also materialises the scores and their softmax (float32); sdpa's CPU
    kernel works in blocks (measured: a 512-row pass over 2048 positions of Qwen2.5-1.5B's shapes in
    bf16 peaks 66 MiB above the weights with sdpa, 190 MiB eager; this gives 81 and 238)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    b = _itemsize(dtype)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    keys = context + rows
    total = (2 * rows * keys * b  # the mask, and its copy in the compute dtype
             + 6 * rows * cfg.hidden_size * b
             + 2 * rows * (heads + 2 * kv_heads) * head_dim * b
             + 2 * heads * head_dim * keys * b
             + 3 * rows * cfg.intermediate_size * b
             + 2 * kv_heads * head_dim * keys * b)
    if getattr(cfg, "_attn_implementation", None) == "eager":
        total += 2 * heads * rows * keys * 4
    return total * 5 // 4


def logits_chunk_rows(config, dtype) -> int:
    """Rows whose logits are computed at once: :data:`LOGITS_CHUNK_BYTES` over a row's logits in the
    compute dtype and in float32, its probabilities, sampling noise and their quotient."""
    return max(1, LOGITS_CHUNK_BYTES // logits_row_bytes(config, dtype))


def logits_row_bytes(config, dtype) -> int:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    return cfg.vocab_size * (_itemsize(dtype) + 4 * 4)


def pass_work_bytes(target_config, draft_config, rows: int, context: int, target_dtype, draft_dtype) -> int:
    """The working set of the largest pass: the target's activations over ``rows`` rows and a draft
    forward beside it (the pipeline drafts while the target waits on reads), or the draft alone over
    ``rows`` (its prompt prefill), plus one chunk of each model's logits (at most ``rows`` rows)."""
    target = activation_bytes(target_config, rows, context, target_dtype)
    draft_step = activation_bytes(draft_config, min(rows, DRAFT_STEP_ROWS), context, draft_dtype)
    draft_alone = activation_bytes(draft_config, rows, context, draft_dtype)
    logits = sum(min(rows, logits_chunk_rows(c, d)) * logits_row_bytes(c, d)
                 for c, d in ((target_config, target_dtype), (draft_config, draft_dtype)))
    return max(target + draft_step, draft_alone) + logits


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


PASS_ROWS = (512, 256, 128, 64, 32, 16)  # pass sizes the plan tries, largest first: the least is the last
RUNTIME_SLACK = 96 * 2**20  # what the runtime grows by once passes run (kernels, thread pools) and allocator slack
LOGITS_CHUNK_BYTES = 64 * 2**20  # per model: logits rows computed at once, with what choosing from them needs
DRAFT_STEP_ROWS = 64  # rows of a draft forward beside a target pass (the pipeline drafts while it waits)


def plan_placement(index: WeightIndex, *, memory_budget, dtype=None, draft_bytes: int = 0,
                   kv_bytes: int = 0, num_buffers: int = 2, max_resident_layers: int | None = None,
                   device_slots: int = 0, sparse_embedding: bool = True, runtime_floor: int = 0,
                   work=None) -> Placement:
    """Keep resident what saves the most bytes read per pass under ``memory_budget``; stream the rest.

    Everything resident reads nothing, so that is the plan when it fits. Otherwise the input embedding
    is read row by row (``sparse_embedding``; not when a tied lm_head serves its rows) and as many
    layers as fit are pinned, spread among the streamed ones (:func:`spread_layers`).

    ``dtype``: compute dtype (None keeps the file's). ``draft_bytes``: the draft's weights.
    ``kv_bytes``: both KV caches at their largest (see :func:`kv_cache_bytes`).
    ``device_slots``: device buffers of the largest streamed layer each (a discrete GPU's upload ring,
    llmcad.streaming.gpu_upload; 0 on the CPU and for zero-copy).
    ``runtime_floor``: the process's resident memory before the weights load (llmcad.memory), counted
    with :data:`RUNTIME_SLACK`; 0: the runtime is not counted (a plan of the models' memory alone).
    ``work``: rows -> bytes of the working set of a pass of that many rows (:func:`pass_work_bytes`);
    the plan reserves the largest of :data:`PASS_ROWS` that fits with no layer resident (None: none
    reserved, ``pass_rows`` unbounded).
    ``max_resident_layers``: pin at most this many layers even when more would fit (benchmarks, tests).
    Raises BudgetError, naming the runtime floor and the least plan, when even k=0 (the least pass,
    draft, non-layer tensors, ``num_buffers`` buffers) does not fit.
    """
    if num_buffers < 1:
        raise BudgetError(f"num_buffers={num_buffers}: the ring needs at least 1 buffer")
    budget = parse_size(memory_budget)
    top = index.num_layers if max_resident_layers is None else max(0, min(max_resident_layers, index.num_layers))
    fixed = {"dtype": dtype, "draft_bytes": draft_bytes, "kv_bytes": kv_bytes, "num_buffers": num_buffers,
             "device_slots": device_slots, "runtime_floor": runtime_floor}
    sparse = sparse_candidates(index) if sparse_embedding else []
    for rows in (PASS_ROWS if work is not None else (None,)):
        work_bytes = work(rows) if rows is not None else 0
        least = _account(index, 0, sparse=sparse, work_bytes=work_bytes, **fixed)
        if least["total"] <= budget:
            break
    else:
        raise BudgetError(_too_small(budget, least, num_buffers, device_slots, rows))
    if top == index.num_layers:
        acct = _account(index, top, sparse=[], work_bytes=work_bytes, **fixed)
        if acct["total"] <= budget:
            return _placement(index, top, acct, budget, num_buffers, [], rows)
    for k in range(top, -1, -1):
        acct = _account(index, k, sparse=sparse, work_bytes=work_bytes, **fixed)
        if acct["total"] <= budget:
            return _placement(index, k, acct, budget, num_buffers, sparse, rows)
    raise AssertionError("k=0 fits")  # the loop above found it does


def _too_small(budget: int, acct: dict, num_buffers: int, device_slots: int, rows) -> str:
    runtime = acct["runtime_floor"] + acct["runtime_slack"]
    plan = acct["total"] - runtime
    floor = (f"the runtime floor measured at start-up ({format_size(acct['runtime_floor'])}, plus "
             f"{format_size(acct['runtime_slack'])} slack) and " if runtime else "")
    least = (f"the least plan ({format_size(plan)}: draft weights {format_size(acct['draft_weights'])}, the "
             f"target's non-layer tensors {format_size(acct['target_non_layer'])}, {num_buffers} layer buffers "
             f"{format_size(acct['streamer_buffers'])}, {device_slots} device slots "
             f"{format_size(acct['device_ring'])}, KV caches {format_size(acct['kv_caches'])}")
    work = f", a {rows}-row pass {format_size(acct['pass_work'])})" if rows is not None else ")"
    return (f"memory_budget={format_size(budget)} ({budget} bytes) is too small: needs at least "
            f"{format_size(acct['total'])} ({acct['total']} bytes) for {floor}{least}{work}")


def resident_placement(index: WeightIndex) -> Placement:
    """Every layer resident (memory_budget=None)."""
    acct = _account(index, index.num_layers, None, draft_bytes=0, kv_bytes=0, num_buffers=0, sparse=[])
    return _placement(index, index.num_layers, acct, None, 0, [])


def sparse_candidates(index: WeightIndex) -> list:
    """Names of the non-layer tensors a pass can read row by row: the input embedding, unless a tied
    lm_head is that tensor (the head needs every row, so it is resident and serves the rows)."""
    embed = index.embedding
    if embed is None or len(embed.shape) != 2 or embed.name in index.tied.values():
        return []
    return [embed.name]


def spread_layers(k: int, num_layers: int) -> list:
    """The ``k`` resident layers of ``num_layers``, spread evenly: the middle of each of k equal runs.

    While a resident layer computes, the streamer reads the next streamed layer into the buffer the
    last one freed; k resident layers in a row would leave it idle once its buffers are full."""
    if not 0 <= k <= num_layers:
        raise ValueError(f"k={k}: expected 0 <= k <= {num_layers}")
    return [(2 * j + 1) * num_layers // (2 * k) for j in range(k)]


def _split_layers(k: int, num_layers: int) -> tuple[list, list]:
    """(resident, streamed) layer ids with k resident (:func:`spread_layers`), each ascending."""
    resident = spread_layers(k, num_layers)
    return resident, [i for i in range(num_layers) if i not in resident]


def _account(index, k, dtype, *, draft_bytes, kv_bytes, num_buffers, device_slots=0, runtime_floor=0,
             work_bytes=0, sparse) -> dict:
    """Byte accounting with k layers resident (:func:`spread_layers`) and the ``sparse`` tensors read by
    rows."""
    resident, streamed = _split_layers(k, index.num_layers)
    buffer = ring_buffer_bytes(index, streamed)
    converts = dtype is not None and any(_converted(t, dtype) for i in streamed for t in index.layers[i])
    acct = {
        "draft_weights": draft_bytes,
        "target_non_layer": sum(_compute_bytes(t, dtype) for t in _resident_non_layer(index, sparse)),
        "sparse_row_cache": sum(row_cache_bytes(index.tensors[n], _as_dtype(dtype) if dtype else None)
                                for n in sparse),
        "target_resident_layers": sum(_compute_bytes(t, dtype) for i in resident for t in index.layers[i]),
        "streamer_buffers": streamer_memory_bytes(buffer, num_buffers, len(index.files)) if streamed else 0,
        "conversion_scratch": max((sum(_compute_bytes(t, dtype) for t in index.layers[i]) for i in streamed),
                                  default=0) if converts else 0,
        "kv_caches": kv_bytes,
        # a device slot holds a layer as the streamer lays it out (llmcad.streaming.gpu_upload)
        "device_ring": device_slots * max((streamer.layout_bytes(index.layer_ranges(i).ranges) for i in streamed),
                                          default=0) if device_slots else 0,
        "runtime_floor": runtime_floor,
        "runtime_slack": RUNTIME_SLACK if runtime_floor else 0,
        "pass_work": work_bytes,
    }
    acct["total"] = sum(acct.values())
    return acct


def _resident_non_layer(index, sparse) -> list:
    """Non-layer tensors held in memory: not read by rows, not a tied alias (held once, as its source)."""
    return [t for t in index.non_layer if t.name not in sparse and t.name not in index.tied]


def _placement(index, k, acct, budget, num_buffers, sparse, pass_rows=None) -> Placement:
    resident, streamed = _split_layers(k, index.num_layers)
    buffer = ring_buffer_bytes(index, streamed)
    if budget is not None:
        acct = dict(acct, spare=budget - acct["total"])
    return Placement(resident_layers=resident, streamed_layers=streamed, buffer_bytes=buffer,
                     num_buffers=num_buffers if streamed else 0,
                     bytes_per_pass=sum(index.layer_bytes(i) for i in streamed),
                     budget_bytes=budget, accounting=acct, sparse_tensors=list(sparse),
                     resident_tensors=[t.name for t in _resident_non_layer(index, sparse)], pass_rows=pass_rows)


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
