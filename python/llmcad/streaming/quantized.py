"""Quantized linear layers at run time: torch's weight-only kernels on the packed bytes of a checkpoint.

A checkpoint written by ``llmcad prepare --quantize`` (llmcad.models.quantize) stores each decoder-layer
linear as ``qweight`` / ``scales`` (/ ``zeros``). :func:`quantize_modules` swaps those nn.Linear modules of
a model built on meta for :class:`QuantizedLinear`, whose parameters have exactly the stored names,
shapes and dtypes, so resident loading and layer streaming bind them like any other parameter.

Kernels (torch built-ins only):
- CPU int8: ``aten._weight_int8pack_mm`` on the stored int8 [N, K] (its own layout); in bfloat16 a
  misaligned operand is first copied to an aligned buffer (:func:`int8_cpu_mm`).
- CPU int4: ``aten._weight_int4pack_mm_for_cpu``; the weight goes through
  ``aten._convert_weight_to_int4pack_for_cpu`` (a layout that depends on the CPU's vector width).
- CUDA int4: ``aten._weight_int4pack_mm`` (bfloat16 activations) after ``aten._convert_weight_to_int4pack``.
- CUDA int8: no weight-only int8 kernel in torch; the int8 weight is cast to the activation dtype inside
  ``F.linear`` and the per-channel scales applied to the output (the same product).
Resident layers are converted to the kernel's layout once (:func:`pack_resident`); streamed layers are
converted inside each forward, from the bytes the streamer bound.

Part of llmcad.streaming: must not import llmcad.speculative, llmcad.models, llmcad.bench or the engine.
"""
from __future__ import annotations

import functools
import threading

import torch

from llmcad.errors import ModelLoadError, WeightFileError

# The checkpoint format (written by llmcad.models.quantize, which imports these)
SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 kernels accept
CONFIG_KEY = "llmcad_quantization"  # config.json key recording the scheme

_CONVERT_ROWS = 1024  # rows converted at a time on CPU: a multiple of every CPU block width (32, 64)


class QuantizedLinear(torch.nn.Module):
    """y = x W^T + b with W stored as int8 per channel or int4 per group (see llmcad.models.quantize)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, scheme: str, group_size: int | None,
                 dtype, device="meta"):
        super().__init__()
        if scheme not in SCHEMES:
            raise ModelLoadError(f"unknown quantization scheme {scheme!r} (expected one of {SCHEMES})")
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.group_size = scheme, group_size
        self.kernel_layout = False  # True once qweight holds the device kernel's layout (resident layers)

        def param(shape, dt):
            return torch.nn.Parameter(torch.empty(shape, dtype=dt, device=device), requires_grad=False)

        n, k = out_features, in_features
        if scheme == "int8":
            self.qweight = param((n, k), torch.int8)
            self.scales = param((n,), dtype)
        else:
            self.qweight = param((n, k // 2), torch.uint8)
            self.scales = param((n, k // group_size), dtype)
            self.zeros = param((n, k // group_size), dtype)
        self.bias = param((n,), dtype) if bias else None

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme}{group}"

    def pack(self) -> None:
        """Convert qweight to the kernel's layout once (resident layers; idempotent). int4's scales and
        zeros become two views of the interleaved operand its kernels take (the same bytes), which every
        forward would otherwise build anew."""
        if not self.kernel_layout:
            self._parameters["qweight"] = torch.nn.Parameter(self._kernel_weight(), requires_grad=False)
            if self.scheme == "int4":
                both = self._scale_zeros()  # a fresh [K/g, N, 2] copy: not laid out so yet
                self._parameters["scales"] = torch.nn.Parameter(both[..., 0].t(), requires_grad=False)
                self._parameters["zeros"] = torch.nn.Parameter(both[..., 1].t(), requires_grad=False)
            self.kernel_layout = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.scheme == "int8":
            y = self._int8(x2)
        else:
            y = self._int4(x2)
        y = y.reshape(*lead, self.out_features)
        return y + self.bias if self.bias is not None else y

    def _kernel_weight(self) -> torch.Tensor:
        if self.kernel_layout or self.scheme == "int8":
            return self.qweight
        if self.qweight.device.type == "cuda":
            return torch.ops.aten._convert_weight_to_int4pack(self.qweight.contiguous(), _inner_k_tiles(self.in_features))
        return cpu_int4_layout(self.qweight)

    def _int8(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return int8_cpu_mm(x, self.qweight, self.scales)
        return torch.nn.functional.linear(x, self.qweight.to(x.dtype)) * self.scales

    def _scale_zeros(self) -> torch.Tensor:
        """Scales and zeros interleaved, [K/g, N, 2], as the int4 kernels take them: a view where
        :meth:`pack` laid them out so, else a copy (streamed layers)."""
        scales, zeros = self.scales, self.zeros
        n, groups = scales.shape
        if (scales.stride() == (2, 2 * n) and zeros.stride() == scales.stride() and zeros.dtype == scales.dtype
                and zeros.data_ptr() == scales.data_ptr() + scales.element_size()):
            return scales.as_strided((groups, n, 2), (2 * n, 2, 1))
        return torch.stack([scales.t(), zeros.t()], dim=-1).contiguous()

    def _int4(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._kernel_weight()
        scale_zeros = self._scale_zeros()
        if x.device.type == "cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), weight, self.group_size, scale_zeros)
        y = torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), weight, self.group_size,
                                               scale_zeros.to(torch.bfloat16))
        return y.to(x.dtype)


def int8_cpu_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (qweight int8 [N, K] * scales [N])^T through ``aten._weight_int8pack_mm``, its
    preconditions met first.

    The kernel's bfloat16 path (AVX2 / AVX-512) reads activation rows with aligned 32-byte loads and weight
    rows with aligned 16-byte loads, K in steps of 16 with no tail: a view that breaks this (a streamed
    weight sits wherever the file put it, often 8 bytes off) kills the process. So in bfloat16 a misaligned
    operand is copied to an aligned one, and K % 16 != 0 takes the dequantized product. The float32 and
    float16 paths load unaligned and handle the tail (tests/test_quantized.py runs misaligned views of
    every dtype in a child process)."""
    n, k = qweight.shape
    if qweight.dtype != torch.int8 or scales.shape != (n,) or scales.dtype != x.dtype or x.shape[-1] != k:
        raise ValueError(f"int8 linear: x {x.dtype} {list(x.shape)}, qweight {qweight.dtype} {list(qweight.shape)}, "
                         f"scales {scales.dtype} {list(scales.shape)}: expected x [M, K] and scales [N] of one "
                         f"dtype, qweight int8 [N, K]")
    x, qweight, scales = x.contiguous(), qweight.contiguous(), scales.contiguous()
    if x.dtype == torch.bfloat16:
        if k % _INT8_K_STEP:
            return torch.nn.functional.linear(x, qweight.to(x.dtype)) * scales
        if x.data_ptr() % _KERNEL_ALIGN:
            x = x.clone()  # a fresh CPU tensor is 64-byte aligned
        if qweight.data_ptr() % _KERNEL_ALIGN:
            qweight = _aligned_copy(qweight)
    return torch.ops.aten._weight_int8pack_mm(x, qweight, scales)


_INT8_K_STEP = 16  # the bfloat16 int8 kernel's step along K
_KERNEL_ALIGN = 64  # bytes: c10's CPU allocation alignment, enough for every aligned load of the kernels
_ALIGNED = threading.local()  # per thread, like _SCRATCH: a buffer for weights copied to an aligned address


def _aligned_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` copied to the start of this thread's reused buffer (64-byte aligned); valid until the next call."""
    buf = getattr(_ALIGNED, "buf", None)
    if buf is None or buf.numel() < t.nbytes:
        buf = _ALIGNED.buf = torch.empty(t.nbytes, dtype=torch.uint8)
    out = buf[:t.nbytes].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] of values 0..15 -> the stored uint8 [N, K/2], even k in the high nibble."""
    return ((q[:, 0::2] << 4) | q[:, 1::2]).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 [N, K] (inverse of :func:`pack_nibbles`)."""
    return torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(packed.shape[0], -1)


def cpu_int4_layout(qweight: torch.Tensor) -> torch.Tensor:
    """Stored nibbles uint8 [N, K/2] -> the CPU int4 kernel's layout (uint8 [N, K/2]).

    torch's conversion op wants one int32 per value and runs a scalar loop (about 5 ns a weight here),
    which would dominate a streamed pass. Its layout is blocked along N: per block of B rows (B = 4x the
    CPU's float vector width), byte (k, j) holds rows j and j + B/2 at column k. Full blocks are therefore
    rearranged with a few vectorized tensor ops, for the block width that reproduces torch's own op on a
    probe (:func:`_cpu_block_rows`); the tail rows, or everything when no width matches, go through the op.
    """
    n, half = qweight.shape
    block = _cpu_block_rows()
    full = n - n % block if block else 0
    out = torch.empty_like(qweight)
    if full:
        _rearrange_blocks(qweight[:full], block, out[:full])
    if full < n:
        out[full:] = _convert_by_op(qweight[full:])
    return out


def _rearrange_blocks(qweight: torch.Tensor, block: int, out: torch.Tensor) -> None:
    """Rows in blocks of ``block`` into ``out`` (uint8 [N, K/2], contiguous):
    out[b, m, 0|1, j] = (row j | row j + block/2 << 4) at column 2m | 2m+1.

    The nibbles are combined on contiguous slabs into a reused scratch buffer (five in-place passes, no
    temporaries), then one transposing copy writes ``out``: fresh temporaries cost more than the ops."""
    n, half = qweight.shape
    blocks = qweight.view(n // block, 2, block // 2, half)
    low, high = blocks[:, 0], blocks[:, 1]  # the rows that go to the low / high nibble
    nibbles = _scratch(qweight.numel()).view(n // block, 2, block // 2, half)
    even, odd = nibbles[:, 0], nibbles[:, 1]  # even columns (stored high nibbles) / odd (stored low nibbles)
    torch.bitwise_right_shift(low, 4, out=odd)  # odd is scratch space until its own turn
    torch.bitwise_and(high, 0xF0, out=even).add_(odd)  # disjoint bits: + is |
    torch.bitwise_and(low, 0x0F, out=odd).add_(high, alpha=16)  # uint8 wraps: 16 * high is high << 4
    out.view(n // block, half, 2, block // 2).copy_(nibbles.permute(0, 3, 1, 2))


_SCRATCH = threading.local()  # per thread: the draft's and the target's forwards may run concurrently


def _scratch(numel: int) -> torch.Tensor:
    """A uint8 buffer of ``numel`` bytes, this thread's, kept for the next call (the largest matrix seen)."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH.buf = torch.empty(numel, dtype=torch.uint8)
    return buf[:numel]


def _convert_by_op(qweight: torch.Tensor) -> torch.Tensor:
    """torch's own conversion, a block of rows at a time (the layout is blocked along N)."""
    n, half = qweight.shape
    out = torch.empty_like(qweight)
    codes = torch.empty((min(n, _CONVERT_ROWS), 2 * half), dtype=torch.int32)
    for start in range(0, n, _CONVERT_ROWS):
        rows = qweight[start:start + _CONVERT_ROWS]
        c = codes[:rows.shape[0]]
        c[:, 0::2] = rows >> 4
        c[:, 1::2] = rows & 0x0F
        out[start:start + rows.shape[0]] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(c, 1).view(rows.shape)
    return out


@functools.lru_cache(maxsize=1)
def _cpu_block_rows() -> int | None:
    """The block width whose rearrangement equals torch's conversion op on this CPU (None: none does)."""
    codes = torch.randint(0, 16, (2 * 64 + 16, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = pack_nibbles(codes)
    want = _convert_by_op(packed)
    for block in (64, 32):
        full = codes.shape[0] - codes.shape[0] % block
        got = torch.empty_like(packed[:full])
        _rearrange_blocks(packed[:full], block, got)
        if torch.equal(got, want[:full]):
            return block
    return None


def _inner_k_tiles(k: int) -> int:
    for tiles in (8, 4, 2):
        if k % (tiles * 16) == 0:
            return tiles
    raise ModelLoadError(f"in_features={k}: the CUDA int4 kernel needs a multiple of 32")


def scheme_of(config) -> dict | None:
    """The quantization record of a config (None for a float model), checked."""
    record = getattr(config, CONFIG_KEY, None)
    if record is None:
        return None
    if not isinstance(record, dict) or record.get("scheme") not in SCHEMES or not record.get("modules") or (
            record["scheme"] == "int4" and record.get("group_size") not in GROUP_SIZES):
        raise ModelLoadError(f"config.json: {CONFIG_KEY} is not a valid quantization record: {record!r}")
    return record


def check_scales(index) -> None:
    """WeightFileError naming the tensor and its file for a scale that is zero, NaN or infinite, or a
    zero point that is NaN or infinite: the product would be garbage, not an error. Reads only these
    tensors (a few bytes per output channel or group), once, at load."""
    from llmcad.streaming.weights import iter_tensors

    names = [t.name for layer in index.layers for t in layer if t.name.endswith((".scales", ".zeros"))]
    for name, values in iter_tensors(index, names):
        flat = values.reshape(-1)
        bad = ~torch.isfinite(flat) if name.endswith(".zeros") else ~torch.isfinite(flat) | (flat == 0)
        if bad.any():
            at = int(bad.nonzero()[0])
            what = "zero points must be finite" if name.endswith(".zeros") else "scales must be finite and non-zero"
            raise WeightFileError(f"{index.files[index.tensors[name].file_index]}: {name!r} holds {flat[at].item()} "
                                  f"at element {at}; quantization {what} (a corrupt or wrongly quantized checkpoint)")


def quantize_modules(model, record: dict, dtype) -> None:
    """Swap the recorded nn.Linear modules of every decoder layer (on meta) for QuantizedLinear."""
    layers = model.model.layers
    for i, layer in enumerate(layers):
        for name in record["modules"]:
            try:
                linear = layer.get_submodule(name)
            except AttributeError:
                raise ModelLoadError(f"config.json: {CONFIG_KEY} names {name!r}, which layer {i} does not have") \
                    from None
            if not isinstance(linear, torch.nn.Linear):
                raise ModelLoadError(f"config.json: {CONFIG_KEY} names {name!r}, not a linear layer")
            owner_name, _, attr = name.rpartition(".")
            owner = layer.get_submodule(owner_name) if owner_name else layer
            setattr(owner, attr, QuantizedLinear(linear.in_features, linear.out_features,
                                                 bias=linear.bias is not None, scheme=record["scheme"],
                                                 group_size=record.get("group_size"), dtype=dtype))


def pack_resident(model, layer_indices) -> None:
    """Convert the quantized linears of the given (loaded) decoder layers to their kernel's layout."""
    layers = model.model.layers
    for i in layer_indices:
        for module in layers[i].modules():
            if isinstance(module, QuantizedLinear):
                module.pack()
