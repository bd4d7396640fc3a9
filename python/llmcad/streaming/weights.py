"""Index of a safetensors checkpoint: which byte ranges hold each decoder layer.

Reads only the headers (8-byte little-endian header length, then a JSON header), single file or
sharded with ``model.safetensors.index.json``. Every header is checked against its file's size at
load time, so a truncated file, a corrupt header or a missing shard fails here with a
:class:`~llmcad.errors.WeightFileError` naming the file, not later in the middle of a pass.

Part of llmcad.streaming: must not import llmcad.speculative, llmcad.models, llmcad.bench or the engine.
"""
from __future__ import annotations

import json
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from llmcad.errors import WeightFileError

if TYPE_CHECKING:
    import torch

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 << 20  # safetensors itself refuses headers above 100 MB

# safetensors dtype code -> bytes per element
ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
_TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
    "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
_LAYER_RE = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.)(?P<idx>\d+)\.(?P<rest>.+)$")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor: where its bytes are (absolute offset in file ``file_index``) and what they are."""

    name: str
    file_index: int
    offset: int
    length: int
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, _TORCH_NAMES[self.dtype])


@dataclass(frozen=True)
class LayerRanges:
    """A decoder layer's bytes as merged contiguous ranges, plus where each tensor sits in them.

    ``ranges[j] = (file_index, offset, length)``; ``tensors[k] = (entry, range_index, delta)`` where
    ``delta`` is the tensor's byte offset from the start of its range.
    """

    ranges: list
    tensors: list

    @property
    def nbytes(self) -> int:
        return sum(length for _, _, length in self.ranges)


@dataclass
class WeightIndex:
    """Headers of a checkpoint. ``layers[i]`` lists layer i's tensors (names keep their full key)."""

    directory: Path
    files: list
    tensors: dict
    layer_prefix: str
    layers: list = field(default_factory=list)
    non_layer: list = field(default_factory=list)
    tied: dict = field(default_factory=dict)  # tied alias -> the stored tensor it shares (a tied head)
    stamps: list = field(default_factory=list)  # per file: file_stamp() when its header was read

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_bytes(self, i: int) -> int:
        return sum(t.length for t in self.layers[i])

    def non_layer_bytes(self) -> int:
        return sum(t.length for t in self.non_layer)

    @property
    def embedding(self) -> TensorEntry | None:
        """The input embedding table (``...embed_tokens.weight``), None when the checkpoint names it otherwise."""
        return next((t for t in self.non_layer if t.name.endswith("embed_tokens.weight")), None)

    def total_bytes(self) -> int:
        return sum(t.length for t in self.tensors.values())

    def check_holds(self, name: str, tensor) -> TensorEntry:
        """The entry of ``name``, which must be indexed with ``tensor``'s shape and dtype (checking a
        written checkpoint against the model it was written from); WeightFileError otherwise."""
        entry = self.tensors.get(name)
        if entry is None:
            raise WeightFileError(f"{self.directory}: tensor {name!r} missing from the written checkpoint")
        if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.torch_dtype:
            raise WeightFileError(f"{self.files[entry.file_index]}: {name!r} written as {list(entry.shape)} "
                                  f"{entry.dtype}, expected {list(tensor.shape)} {tensor.dtype}")
        return entry

    def local_name(self, entry: TensorEntry, layer: int) -> str:
        """Name of a layer tensor relative to its layer module, e.g. ``self_attn.q_proj.weight``."""
        return entry.name[len(f"{self.layer_prefix}{layer}."):]

    def layer_ranges(self, i: int) -> LayerRanges:
        """Merge layer i's tensors into as few contiguous (file, offset, length) reads as possible."""
        ordered = sorted(self.layers[i], key=lambda t: (t.file_index, t.offset))
        ranges, placed = [], []
        for t in ordered:
            if ranges and ranges[-1][0] == t.file_index and ranges[-1][1] + ranges[-1][2] == t.offset:
                f, off, length = ranges[-1]
                ranges[-1] = (f, off, length + t.length)
            else:
                ranges.append((t.file_index, t.offset, t.length))
            placed.append((t, len(ranges) - 1, t.offset - ranges[-1][1]))
        return LayerRanges(ranges=ranges, tensors=placed)


def file_stamp(path) -> tuple:
    """(device, inode, size, modification ns, status change ns): what tells a file changed since it was
    indexed. The ctime catches an edit in place whose mtime was set back (utime changes the ctime)."""
    return stat_stamp(Path(path).stat())


def stat_stamp(st) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def open_weight_file(path) -> int:
    """A read-only descriptor on ``path``, which must be a regular file: opened without blocking (a FIFO
    in a weight file's place would block an ordinary open forever), then checked with fstat.
    WeightFileError naming the file otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise WeightFileError(f"{path}: weight file not found") from None
    except OSError as exc:
        raise WeightFileError(f"{path}: cannot open weight file: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise WeightFileError(f"{path}: is {kind}, not a safetensors file")
    os.set_blocking(fd, True)
    return fd


def read_header(path) -> tuple[dict, int]:
    """Parse one safetensors file's header. Returns (entries by name, data start offset).

    Each entry is ``{"dtype", "shape", "offset", "length"}`` with the offset absolute in the file.
    Raises WeightFileError naming the file when it is missing, not a regular file, truncated or corrupt.
    """
    fd = open_weight_file(path)
    try:
        return read_header_fd(fd, path)
    finally:
        os.close(fd)


def read_header_fd(fd: int, path) -> tuple[dict, int]:
    """:func:`read_header` of the file open as ``fd`` (``path`` names it in errors)."""
    path = Path(path)
    size = os.fstat(fd).st_size
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise WeightFileError(f"{path}: truncated safetensors file ({size} bytes, no header)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise WeightFileError(
            f"{path}: corrupt or truncated safetensors header (declares {n} header bytes, file has {size})")
    raw = os.pread(fd, n, 8)
    header = _parse_header_json(path, raw)
    start = 8 + n
    entries = {name: _check_entry(path, name, info, start, size)
               for name, info in header.items() if name != "__metadata__"}
    _check_metadata(path, header.get("__metadata__"))
    _check_layout(path, entries, start, size)
    return entries, start


def _parse_header_json(path, raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise WeightFileError(f"{path}: corrupt safetensors header (JSON nested too deeply)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightFileError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise WeightFileError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header


def _check_metadata(path, metadata) -> None:
    """``__metadata__``, where present, is a flat str -> str map (as safetensors itself requires)."""
    if metadata is not None and not (isinstance(metadata, dict) and
                                     all(isinstance(v, str) for v in metadata.values())):
        raise WeightFileError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")


def _check_layout(path, entries: dict, start: int, size: int) -> None:
    """Tensors must tile the data section without overlapping, as safetensors itself requires (HF and
    the resident path refuse such a file; streaming must not read one tensor's bytes as another's)."""
    end = start
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1]["offset"], kv[1]["length"])):
        if e["offset"] < end:
            raise WeightFileError(f"{path}: corrupt safetensors header: {name!r} (bytes {e['offset']}.."
                                  f"{e['offset'] + e['length']}) overlaps the tensor before it (which ends at {end})")
        if e["offset"] > end:
            raise WeightFileError(f"{path}: corrupt safetensors header: a gap of {e['offset'] - end} bytes "
                                  f"before {name!r} (tensors must be contiguous)")
        end = e["offset"] + e["length"]
    if end != size:
        raise WeightFileError(f"{path}: corrupt safetensors file: {size - end} bytes after the last tensor")


def _check_entry(path, name, info, start, size) -> dict:
    """Validate one header entry against the dtype table and the file size."""
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        if not all(type(v) is int for v in (*shape, begin, end)):  # 1.5, 1e999 (inf), "3", true
            raise TypeError
        shape = tuple(shape)
    except (KeyError, TypeError, ValueError):
        raise WeightFileError(f"{path}: corrupt safetensors header entry for {name!r}: {str(info)[:200]}") from None
    if dtype not in ITEMSIZE or any(d < 0 for d in shape) or not 0 <= begin <= end:
        raise WeightFileError(f"{path}: corrupt safetensors header entry for {name!r}: {info}")
    numel = 1
    for d in shape:
        numel *= d
    if end - begin != numel * ITEMSIZE[dtype]:
        raise WeightFileError(
            f"{path}: corrupt safetensors header: {name!r} spans {end - begin} bytes, "
            f"shape {list(shape)} {dtype} needs {numel * ITEMSIZE[dtype]}")
    if start + end > size:
        raise WeightFileError(
            f"{path}: truncated safetensors file: {name!r} ends at byte {start + end}, "
            f"file has {size}")
    return {"dtype": dtype, "shape": shape, "offset": start + begin, "length": end - begin}


def checkpoint_files(directory) -> list[Path]:
    """The safetensors files of a checkpoint directory, in shard order (or [the single file]). Each
    must lie inside the directory (see :func:`_inside`): a shard index naming an absolute path, a
    ``..`` or a link out of it is refused."""
    directory = Path(directory)
    index_path = directory / SHARD_INDEX
    if index_path.exists() and not index_path.is_file():
        raise WeightFileError(f"{index_path}: not a regular file (a FIFO, device or directory)")
    if index_path.exists():
        files = [_shard_path(directory, index_path, name) for name in _weight_map_files(index_path)]
        for f in files:
            if not f.exists():
                raise WeightFileError(f"{f}: shard listed in {index_path.name} is missing")
    elif (directory / SINGLE_FILE).exists():
        files = [directory / SINGLE_FILE]
    else:
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise WeightFileError(f"{directory}: no safetensors weights (expected {SINGLE_FILE} or {SHARD_INDEX})")
    for f in files:
        if not _inside(directory, f):
            raise WeightFileError(f"{f}: links to {f.resolve()}, outside the model directory; refusing to read it "
                                  "(copy the file into the directory instead)")
    return files


def _weight_map_files(index_path: Path) -> list:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError, KeyError, TypeError,
            AttributeError) as exc:
        raise WeightFileError(f"{index_path}: corrupt shard index ({type(exc).__name__}: {exc})") from None
    if not all(isinstance(n, str) for n in names):
        raise WeightFileError(f"{index_path}: corrupt shard index (weight_map values must be file names)")
    return names


def _shard_path(directory: Path, index_path: Path, name: str) -> Path:
    """``directory / name`` for a plain relative name; WeightFileError for an absolute path or ``..``."""
    relative = Path(name)
    if not name or relative.is_absolute() or ".." in relative.parts or "\x00" in name:
        raise WeightFileError(f"{index_path}: weight_map names {name!r}, not a file inside the model directory; "
                              "refusing to read it")
    return directory / relative


def _inside(directory: Path, path: Path) -> bool:
    """Whether ``path`` resolves inside ``directory``, or, for a Hugging Face hub cache snapshot
    (``<repo>/snapshots/<revision>/``, whose files link to ``<repo>/blobs/``), inside its blobs."""
    root, target = directory.resolve(), path.resolve()
    if root in target.parents:
        return True
    return root.parent.name == "snapshots" and (root.parent.parent / "blobs") in target.parents


def load_index(directory) -> WeightIndex:
    """Read every header of a checkpoint directory and group tensors by decoder layer."""
    directory = Path(directory)
    if not directory.is_dir():
        raise WeightFileError(f"{directory}: checkpoint directory not found")
    files = checkpoint_files(directory)
    tensors, stamps = {}, []
    for fi, path in enumerate(files):
        fd = open_weight_file(path)
        try:  # the stamp is of the file whose header is read (a file swapped between them shows later)
            stamps.append(stat_stamp(os.fstat(fd)))
            entries, _ = read_header_fd(fd, path)
        finally:
            os.close(fd)
        for name, e in entries.items():
            if name in tensors:
                raise WeightFileError(f"{path}: tensor {name!r} also appears in {files[tensors[name].file_index]}")
            tensors[name] = TensorEntry(name, fi, e["offset"], e["length"], e["dtype"], e["shape"])
    _check_shard_map(directory, files, tensors)
    index = _group_layers(directory, files, tensors)
    index.stamps = stamps
    return index


def _check_shard_map(directory, files, tensors) -> None:
    """Every tensor the shard index promises must be in the shard it names."""
    index_path = directory / SHARD_INDEX
    if not index_path.exists():
        return
    weight_map = json.loads(index_path.read_text())["weight_map"]
    for name, fname in weight_map.items():
        t = tensors.get(name)
        if t is None or files[t.file_index].name != fname:
            raise WeightFileError(f"{directory / fname}: tensor {name!r} listed in {SHARD_INDEX} is not in it")


def _group_layers(directory, files, tensors) -> WeightIndex:
    by_prefix: dict = {}
    for name in tensors:
        m = _LAYER_RE.match(name)
        if m:
            by_prefix.setdefault(m["prefix"], []).append((int(m["idx"]), name))
    if not by_prefix:
        raise WeightFileError(f"{directory}: no decoder layers found (no '<prefix>layers.<i>.' tensors)")
    prefix = "model.layers." if "model.layers." in by_prefix else max(by_prefix, key=lambda p: len(by_prefix[p]))
    count = 1 + max(i for i, _ in by_prefix[prefix])
    layers = [[] for _ in range(count)]
    for i, name in by_prefix[prefix]:
        layers[i].append(tensors[name])
    empty = [i for i, layer in enumerate(layers) if not layer]
    if empty:
        raise WeightFileError(f"{directory}: decoder layers {empty} have no tensors (missing shard or tensors?)")
    for layer in layers:
        layer.sort(key=lambda t: t.name)
    in_layers = {t.name for layer in layers for t in layer}
    non_layer = sorted((t for n, t in tensors.items() if n not in in_layers), key=lambda t: t.name)
    return WeightIndex(directory, files, tensors, prefix, layers, non_layer, _tied(directory, files, tensors))


def _tied(directory: Path, files: list, tensors: dict) -> dict:
    """{"lm_head.weight": embedding name} when config.json ties them and the head is not stored, or is
    stored with the embedding's bytes (transformers ties those too; a head stored with other values is
    its own tensor, as transformers keeps it)."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    text = config.get("text_config", config)
    tie = text.get("tie_word_embeddings", config.get("tie_word_embeddings", True))
    embed = next((n for n in tensors if n.endswith("embed_tokens.weight")), None)
    head = tensors.get("lm_head.weight")
    if tie and embed and (head is None or _same_bytes(files, head, tensors[embed])):
        return {"lm_head.weight": embed}
    return {}


def _same_bytes(files: list, a: TensorEntry, b: TensorEntry, chunk: int = 16 << 20) -> bool:
    """Whether two stored tensors hold the same dtype, shape and bytes (compared a chunk at a time)."""
    if (a.dtype, a.shape) != (b.dtype, b.shape):
        return False
    with open(files[a.file_index], "rb") as fa, open(files[b.file_index], "rb") as fb:
        for start in range(0, a.length, chunk):
            n = min(chunk, a.length - start)
            if os.pread(fa.fileno(), n, a.offset + start) != os.pread(fb.fileno(), n, b.offset + start):
                return False
    return True


def read_tensor(fd: int, entry: TensorEntry, path) -> "torch.Tensor":
    """Tensor ``entry`` read from descriptor ``fd`` into memory the caller owns (not a mapping of the
    file: a file changed or truncated later changes nothing in it). WeightFileError on a short read."""
    import torch

    raw = torch.empty(entry.length, dtype=torch.uint8)
    view, done = memoryview(raw.numpy()), 0
    while done < entry.length:
        try:
            n = os.preadv(fd, [view[done:]], entry.offset + done)
        except OSError as exc:
            raise WeightFileError(f"{path}: reading {entry.name!r} failed: {exc.strerror}") from None
        if n == 0:
            raise WeightFileError(f"{path}: truncated while reading {entry.name!r} (end of file at byte "
                                  f"{entry.offset + done}, the tensor ends at {entry.offset + entry.length})")
        done += n
    return raw.view(entry.torch_dtype).reshape(entry.shape)


def read_tensors(index: WeightIndex, names) -> dict:
    """{name: owned tensor} for ``names`` of ``index`` (see :func:`iter_tensors`)."""
    return dict(iter_tensors(index, names))


def iter_tensors(index: WeightIndex, names):
    """(name, owned tensor) for ``names`` of ``index``, read file by file, tensor by tensor, so a caller
    converting each one holds one raw tensor at a time. WeightFileError naming the file when it changed
    since it was indexed."""
    by_file: dict = {}
    for name in names:
        entry = index.tensors[name]
        by_file.setdefault(entry.file_index, []).append(entry)
    for fi, entries in sorted(by_file.items()):
        path = index.files[fi]
        fd = open_weight_file(path)
        try:
            if index.stamps and stat_stamp(os.fstat(fd)) != index.stamps[fi]:
                raise WeightFileError(f"{path}: changed on disk while the model was loading; load it again")
            for entry in sorted(entries, key=lambda e: e.offset):
                yield entry.name, read_tensor(fd, entry, path)
        finally:
            os.close(fd)
