"""Tensor-by-tensor conversion for ``llmcad prepare``: memory bounded by a slice, not by the model.

A source yields its weights one tensor at a time (a large tensor in slices of rows), already in the
model's names and the output dtype; :class:`SafetensorsWriter` writes each slice where the header
(computed up front from the shapes) puts it. Peak memory is the runtime plus one slice and one layer
tensor, whatever the model's size.

- GGUF (``gguf_source``): transformers' legacy GGUF loader done tensor by tensor: the same tensor
  arrays ``gguf.GGUFReader`` gives (read from the tensor table here, without building the metadata's
  vocabulary arrays, which cost hundreds of MB), ``gguf.dequantize``, name map
  (``get_gguf_hf_weights_map``) and tensor processor, then the same ``torch.from_numpy(...).to(dtype)``;
  so the values are exactly what ``from_pretrained(gguf_file=..., dtype=...)`` holds. Pages of the
  mapped file are dropped after each slice. Architectures transformers converts otherwise (its newer GGUF path, or processors that
  merge tensors) return None: the caller loads the whole model instead.
- safetensors (``safetensors_source``): each stored tensor cast to the dtype, when the names are
  exactly the model's (otherwise None: transformers may rename or fuse them on load).

Part of llmcad.models: may use llmcad.streaming; must not import llmcad.speculative, llmcad.bench or the engine.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch

from llmcad.errors import ModelLoadError, WeightFileError

SLICE_BYTES = 16 << 20  # float32 bytes of one converted slice of a large tensor
_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int8: "I8",
          torch.uint8: "U8", torch.int64: "I64", torch.int32: "I32"}


@dataclass
class Source:
    """A model to write: ``model`` on meta (config, generation config, tied keys), ``shapes`` of the
    tensors to write in the model's names, and ``slices()`` yielding (name, first row, rows) in ``dtype``."""

    model: torch.nn.Module
    shapes: dict
    slices: Callable[[], Iterator]
    dtype: torch.dtype
    note: str = ""  # said once the model is written (e.g. which tensor a tied embedding kept)
    tensor_types: tuple = ()  # a GGUF's quantization type names (Q4_K, ...), sorted
    _close: Callable = field(default=lambda: None)

    def close(self) -> None:
        self._close()


def meta_model(config, dtype):
    """``config``'s causal LM on the meta device, as from_pretrained would build it (generation config too)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.dtype = dtype
    return model.eval()


def expected_shapes(model) -> dict:
    """{name: shape} save_pretrained writes for ``model``: its state dict less the tied aliases."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}


# ---- GGUF ----
def gguf_source(path: Path, dtype: torch.dtype, tie_embeddings: bool = False) -> Source | None:
    """The GGUF file ``path`` as a tensor-by-tensor Source, or None when transformers would convert
    this architecture otherwise (the caller then loads the whole model).

    ``tie_embeddings``: the output and the embedding tensor must have one shape; the output's values
    (GGUF files quantize it finer) are written once, as the embedding, and config.json ties the head
    to it. Lossless for a draft: only the target decides the output.
    """
    from gguf import dequantize
    from transformers import AutoConfig
    from transformers.integrations.gguf import is_gguf_arch_supported
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    architecture, tensors, pages = read_gguf_tensors(path)
    processor_class = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
    if is_gguf_arch_supported(architecture) or processor_class not in (TensorProcessor,
                                                                      TENSOR_PROCESSORS.get("llama")):
        return None
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
    names = {t.name for t in tensors}
    if tie_embeddings:
        _check_tieable(tensors, path)
        config.tie_word_embeddings = True
    model = meta_model(config, dtype)
    # the legacy loader hands processors the parsed GGUF config; the llama one reads only head counts
    processor = processor_class(config=config.to_dict())
    mapping = get_gguf_hf_weights_map(model, processor)
    skip = {"token_embd.weight"} if tie_embeddings else set()
    rename = {"output.weight": mapping["token_embd.weight"]} if tie_embeddings else {}
    produced = {rename.get(n, mapping.get(n)) for n in names - skip} - {None}
    shapes = expected_shapes(model)
    if produced != set(shapes):
        return None  # names transformers fills or merges otherwise: not a one-to-one conversion
    chunked = processor_class is TensorProcessor  # identity processor: rows convert independently

    def slices():
        for tensor in tensors:
            name = rename.get(tensor.name, mapping.get(tensor.name))
            if tensor.name in skip or name is None:
                continue
            rows = tensor.data.shape[0] if chunked and tensor.data.ndim == 2 else None
            step = max(1, SLICE_BYTES // max(1, 4 * _row_elements(shapes[name]))) if rows else None
            for start in range(0, rows or 1, step or 1):
                part = tensor.data[start:start + step] if rows else tensor.data
                weights = processor.process(weights=dequantize(part, tensor.tensor_type), name=tensor.name,
                                            tensor_key_mapping=mapping, parsed_parameters={}).weights
                converted = torch.from_numpy(weights.copy()).to(dtype)
                del weights
                _drop_pages(pages, tensor.data_offset, tensor.n_bytes)  # read: not needed again
                _trim_heap()
                yield name, start, converted

    note = "--tie-embeddings: the output tensor's values are written once, as the embedding" if tie_embeddings else ""
    return Source(model, shapes, slices, dtype, note, tuple(sorted({t.tensor_type.name for t in tensors})))


def _check_tieable(tensors, path) -> None:
    tensors = {t.name: t for t in tensors}
    out, embed = tensors.get("output.weight"), tensors.get("token_embd.weight")
    if out is None or embed is None:
        raise ModelLoadError(f"--tie-embeddings: {path} has no separate output tensor (already tied)")
    if out.shape != embed.shape:
        raise ModelLoadError(f"--tie-embeddings: {path}: output {list(out.shape)} and embedding "
                             f"{list(embed.shape)} differ in shape, not only by quantization")


class GgufTensor(NamedTuple):
    """One tensor of a GGUF file, as gguf.GGUFReader describes it (``data``: a view of the mapped file)."""

    name: str
    shape: tuple  # torch order, in values
    tensor_type: object  # gguf.GGMLQuantizationType
    data: object  # numpy: values for float/int types, bytes [..., bytes per row] for block types
    data_offset: int  # absolute, in the file
    n_bytes: int


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}
_GGUF_VALUES = {"F16": "float16", "F32": "float32", "F64": "float64", "I8": "int8", "I16": "int16",
                "I32": "int32", "I64": "int64"}


def read_gguf_tensors(path: Path) -> tuple[str, list, object]:
    """(architecture, [GgufTensor] in file order, the file's mmap) from the header and tensor table; the
    metadata is walked, not kept (GGUFReader builds an array per vocabulary entry)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    blob = np.memmap(path, mode="r", dtype=np.uint8)
    if bytes(blob[:4]) != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (no GGUF magic)")
    _, count, kv_count = struct.unpack_from("<IQQ", blob, 4)
    pos, meta = 24, {}
    for _ in range(kv_count):
        key, pos = _gguf_string(blob, pos)
        (kind,) = struct.unpack_from("<I", blob, pos)
        value, pos = _gguf_value(blob, pos + 4, kind, keep=key in ("general.architecture", "general.alignment"))
        meta[key] = value
    entries = []
    for _ in range(count):
        name, pos = _gguf_string(blob, pos)
        (dims_count,) = struct.unpack_from("<I", blob, pos)
        dims = struct.unpack_from(f"<{dims_count}Q", blob, pos + 4)
        kind, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * dims_count)
        pos += 4 + 8 * dims_count + 12
        entries.append((name, dims, GGMLQuantizationType(kind), offset))
    alignment = meta.get("general.alignment") or 32
    start = (pos + alignment - 1) // alignment * alignment
    tensors = []
    for name, dims, kind, offset in entries:
        block, size = GGML_QUANT_SIZES[kind]
        shape, elements = tuple(reversed(dims)), _numel(dims)
        n_bytes = elements * size // block
        where = start + offset
        if kind.name in _GGUF_VALUES:
            data = blob[where:where + n_bytes].view(_GGUF_VALUES[kind.name]).reshape(shape)
        else:
            data = blob[where:where + n_bytes].reshape(quant_shape_to_byte_shape(shape, kind))
        tensors.append(GgufTensor(name, shape, kind, data, where, n_bytes))
    return meta["general.architecture"], tensors, blob._mmap


def _gguf_string(blob, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", blob, pos)
    return bytes(blob[pos + 8:pos + 8 + length]).decode("utf-8"), pos + 8 + length


def _gguf_value(blob, pos: int, kind: int, keep: bool):
    """(value or None when not ``keep``, position after it)."""
    if kind in _GGUF_SCALARS:
        (value,) = struct.unpack_from(_GGUF_SCALARS[kind], blob, pos)
        return value, pos + struct.calcsize(_GGUF_SCALARS[kind])
    if kind == 8:
        value, end = _gguf_string(blob, pos)
        return (value if keep else None), end
    if kind == 9:
        item, n = struct.unpack_from("<IQ", blob, pos)
        pos += 12
        if item in _GGUF_SCALARS:
            return None, pos + n * struct.calcsize(_GGUF_SCALARS[item])
        for _ in range(n):
            _, pos = _gguf_value(blob, pos, item, keep=False)
        return None, pos
    raise ValueError(f"GGUF metadata value of unknown type {kind}")


def _row_elements(shape) -> int:
    n = 1
    for d in shape[1:]:
        n *= d
    return n


def _trim_heap() -> None:
    """Hand the heap's free memory back to the kernel (glibc keeps freed slices' arenas, so the RSS would
    creep up slice after slice); a no-op where there is no glibc."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim(0)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None  # ctypes handle on glibc once looked up, False where there is none


def _drop_pages(pages, offset: int, length: int) -> None:
    """Let the kernel drop the mapped file's pages of a converted tensor (they count in the RSS)."""
    start = offset // mmap.PAGESIZE * mmap.PAGESIZE
    try:
        pages.madvise(mmap.MADV_DONTNEED, start, min(len(pages) - start, length + offset - start))
    except (OSError, ValueError, AttributeError):
        pass  # only the peak suffers


# ---- safetensors ----
def safetensors_source(directory: Path, dtype: torch.dtype) -> Source | None:
    """The checkpoint ``directory`` (safetensors) as a tensor-by-tensor Source; None when its names are
    not exactly the model's (transformers renames or fuses them on load: the caller loads the model)."""
    from transformers import AutoConfig

    from llmcad.streaming.weights import iter_tensors, load_index

    try:
        index = load_index(directory)
    except WeightFileError:
        return None
    model = meta_model(AutoConfig.from_pretrained(directory, trust_remote_code=False), dtype)
    shapes = expected_shapes(model)
    stored = {n: t.shape for n, t in index.tensors.items() if n in shapes}
    if stored != shapes:
        return None

    def slices():
        for name, tensor in iter_tensors(index, list(shapes)):
            yield name, 0, tensor.to(dtype)

    return Source(model, shapes, slices, dtype)


# ---- writing ----
DATA_ALIGN = 64  # bytes: where a written file's tensor data starts


class SafetensorsWriter:
    """A safetensors file written slice by slice at offsets fixed by ``specs`` ({name: (dtype, shape)}).

    Tensors are grouped by decoder layer, so each layer is one byte range; within a group wider dtypes
    come first (item-size alignment). ``digests()`` are sha256 of each tensor's bytes as written.
    """

    def __init__(self, path: Path, specs: dict):
        self.path = Path(path)
        header, offset, self._where = {"__metadata__": {"format": "pt"}}, 0, {}
        for name in layout_order(specs):
            dtype, shape = specs[name]
            if dtype not in _CODES:
                raise WeightFileError(f"{path}: cannot write {name!r} of dtype {dtype}")
            nbytes = _numel(shape) * dtype.itemsize
            header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._where[name] = [offset, nbytes, 0, hashlib.sha256()]  # start, length, written, digest
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        # data starts 64-byte aligned (safetensors allows a header padded with spaces): a streamed view lies at
        # its file offset modulo the page, and the CPU int8 kernel's bf16 path wants aligned weight rows
        raw += b" " * (-(8 + len(raw)) % DATA_ALIGN)
        self._data = 8 + len(raw)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
        os.pwrite(self._fd, struct.pack("<Q", len(raw)) + raw, 0)
        os.ftruncate(self._fd, self._data + offset)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next bytes of ``name`` (slices of one tensor arrive in order)."""
        start, length, done, digest = self._where[name]
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        if done + data.nbytes > length:
            raise WeightFileError(f"{self.path}: {name!r} given more bytes than its shape holds")
        view, written = memoryview(data), 0
        while written < data.nbytes:
            written += os.pwrite(self._fd, view[written:], self._data + start + done + written)
        digest.update(view)
        self._where[name][2] = done + data.nbytes

    def close(self) -> dict:
        """Closes the file; returns {name: sha256 hex}. WeightFileError if a tensor was left short."""
        os.close(self._fd)
        short = [n for n, (_, length, done, _) in self._where.items() if done != length]
        if short:
            raise WeightFileError(f"{self.path}: tensors not fully written: {short[:3]}")
        return {n: w[3].hexdigest() for n, w in self._where.items()}


def write_source(source: Source, out: Path, transform=None, specs: dict | None = None) -> dict:
    """Write ``source`` into ``out``/model.safetensors; returns the digests. ``transform(name, tensor)``
    maps one whole tensor to {name: tensor} (quantization) with ``specs`` the resulting layout."""
    from tqdm import tqdm

    specs = specs or {n: (source.dtype, s) for n, s in source.shapes.items()}
    writer = SafetensorsWriter(Path(out) / "model.safetensors", specs)
    total = sum(math.prod(shape) for shape in source.shapes.values()) * source.dtype.itemsize  # bytes read
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc="prepare: tensors", leave=False) as bar:
            for name, _, part in source.slices():
                if transform is None:
                    writer.write(name, part)
                else:
                    for key, value in transform(name, part).items():
                        writer.write(key, value)
                bar.update(part.numel() * source.dtype.itemsize)
    except BaseException:
        os.close(writer._fd)
        raise
    return writer.close()


def verify_digests(out: Path, digests: dict, chunk: int = 16 << 20) -> None:
    """Re-read every written tensor (a chunk at a time) and compare it with what was written."""
    from llmcad.streaming.weights import load_index

    index = load_index(out)
    missing = sorted(set(digests) - set(index.tensors))
    if missing:
        raise WeightFileError(f"{out}: tensor {missing[0]!r} missing from the written checkpoint")
    for name, want in digests.items():
        entry = index.tensors[name]
        digest = hashlib.sha256()
        with open(index.files[entry.file_index], "rb") as f:
            for start in range(0, entry.length, chunk):
                digest.update(os.pread(f.fileno(), min(chunk, entry.length - start), entry.offset + start))
        if digest.hexdigest() != want:
            raise WeightFileError(f"{index.files[entry.file_index]}: {name!r} differs from what was written")


def layout_order(specs: dict) -> list:
    """Names of ``specs`` ({name: (dtype, shape)}) in file order: non-layer tensors, then layer by layer;
    wider dtypes first within each group."""
    return sorted(specs, key=lambda name: (_group_key(name), -specs[name][0].itemsize, name))


def _group_key(name: str) -> tuple:
    """(0, name) for non-layer tensors, (1, layer index) for decoder-layer tensors."""
    parts = name.split(".")
    for j, part in enumerate(parts[:-1]):
        if part == "layers" and parts[j + 1].isdigit():
            return (1, int(parts[j + 1]), "")
    return (0, 0, "")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
