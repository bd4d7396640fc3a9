"""Offline weight-only quantization of a model's decoder-layer linears (``llmcad prepare --quantize``).

Formats on disk (device independent; :mod:`llmcad.streaming.quantized` turns them into the kernels'
layouts where a kernel needs another one):

- ``int8``: symmetric, per output channel. ``<linear>.qweight`` int8 [N, K], ``<linear>.scales`` [N];
  w = qweight * scales.
- ``int4``: asymmetric, per group of ``group_size`` inputs. ``<linear>.qweight`` uint8 [N, K/2] with two
  values a byte (even k in the high nibble, odd k in the low one), ``<linear>.scales`` and
  ``<linear>.zeros`` [N, K/group_size]; w = (q - 8) * scales + zeros, q in 0..15 (torch's int4 kernels'
  convention: ``zeros`` is the value at q = 8).

Scales and zeros are stored in the checkpoint's float dtype; the value stored is the one the
quantization used, so the model is defined by the written bytes. Embeddings, norms, biases and the
lm_head stay in float. ``config.json`` records the scheme under :data:`CONFIG_KEY`.

Part of llmcad.models: may use llmcad.streaming; must not import llmcad.speculative, llmcad.bench or the engine.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from llmcad.errors import ModelLoadError, WeightFileError
from llmcad.models.convert import SafetensorsWriter
from llmcad.streaming.quantized import CONFIG_KEY, GROUP_SIZES, SCHEMES, pack_nibbles, unpack_nibbles

DEFAULT_GROUP_SIZE = 128
_INT8_MAX = 127
_INT4_MAX = 15


# ---- the two schemes, one tensor at a time ----
def quantize_int8(weight: torch.Tensor, scale_dtype) -> dict:
    """{"qweight": int8 [N, K], "scales": [N] in ``scale_dtype``}: symmetric per output channel."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / _INT8_MAX).clamp_min(_smallest(scale_dtype)).to(scale_dtype)
    q = torch.round(w / scales.float()[:, None]).clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return {"qweight": q.contiguous(), "scales": scales.contiguous()}


def quantize_int4(weight: torch.Tensor, group_size: int, scale_dtype) -> dict:
    """{"qweight": uint8 [N, K/2], "scales", "zeros": [N, K/group_size]}: asymmetric min/max per group."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((high - low) / _INT4_MAX).clamp_min(_smallest(scale_dtype)).to(scale_dtype)
    zeros = (low + 8 * scales.float()).to(scale_dtype)
    # codes from the stored (rounded) scale and zero, so dequantization is the nearest grid point
    q = torch.round((w - zeros.float()[..., None]) / scales.float()[..., None] + 8).clamp(0, _INT4_MAX)
    return {"qweight": pack_nibbles(q.to(torch.uint8).reshape(n, k)), "scales": scales.contiguous(),
            "zeros": zeros.contiguous()}


def _smallest(scale_dtype) -> float:
    """The smallest normal number of the stored scales' dtype: a constant row or group gets this scale,
    never 0 (float32's smallest would round to 0 in float16, and loading refuses zero scales)."""
    return torch.finfo(scale_dtype).tiny


def dequantize(tensors: dict, scheme: str, group_size: int | None = None) -> torch.Tensor:
    """The float32 weight a quantized linear stands for (rows of it for a packed embedding's lookups;
    the reference for tests and quality checks)."""
    if scheme == "int8":
        return tensors["qweight"].float() * tensors["scales"].float()[:, None]
    q = unpack_nibbles(tensors["qweight"]).float()
    n, k = q.shape
    q = q.reshape(n, k // group_size, group_size)
    w = (q - 8) * tensors["scales"].float()[..., None] + tensors["zeros"].float()[..., None]
    return w.reshape(n, k)


def check_scheme(scheme: str, group_size: int | None) -> int | None:
    """The group size to use (None for int8); ModelLoadError for an unknown scheme or group size."""
    if scheme not in SCHEMES:
        raise ModelLoadError(f"--quantize {scheme!r}: choose one of {', '.join(SCHEMES)}")
    if scheme == "int8":
        if group_size is not None:
            raise ModelLoadError("--group-size applies to int4 only (int8 is per output channel)")
        return None
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if group_size not in GROUP_SIZES:
        raise ModelLoadError(f"--group-size {group_size}: torch's int4 kernels take "
                             f"{', '.join(map(str, GROUP_SIZES))}")
    return group_size


# ---- a whole model ----
def quantizable_linears(layer: torch.nn.Module) -> list[str]:
    """Names (relative to a decoder layer) of its nn.Linear modules, in module order."""
    return [name for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]


def check_shapes(layer: torch.nn.Module, scheme: str, group_size: int | None) -> None:
    """The kernels' constraints: int4 needs K divisible by the group size and N by 16."""
    for name in quantizable_linears(layer):
        n, k = layer.get_submodule(name).weight.shape
        if scheme == "int4" and (k % group_size or n % 16):
            raise ModelLoadError(
                f"{name}: weight [{n}, {k}] cannot be int4 with group size {group_size} (torch's int4 "
                f"kernels need in_features divisible by the group size and out_features by 16); "
                f"try another --group-size or --quantize int8")


def quantized_state(model, scheme: str, group_size: int | None, scale_dtype) -> tuple[dict, dict]:
    """(state dict to write, scheme record for config.json) for ``model``'s decoder-layer linears."""
    from llmcad.streaming.streamed import decoder_layers

    layers = decoder_layers(model)
    names = quantizable_linears(layers[0])
    if not names:
        raise ModelLoadError(f"{type(model).__name__}: its decoder layers have no nn.Linear to quantize")
    check_shapes(layers[0], scheme, group_size)
    state = dict(model.state_dict())
    prefix = _layers_prefix(model, layers)
    for i, layer in enumerate(layers):
        for name in names:
            key = f"{prefix}{i}.{name}"
            weight = state.pop(f"{key}.weight")
            packed = (quantize_int8(weight, scale_dtype) if scheme == "int8"
                      else quantize_int4(weight, group_size, scale_dtype))
            state.update((f"{key}.{part}", t) for part, t in packed.items())
    record = {"scheme": scheme, "group_size": group_size, "modules": names,
              "scale_dtype": str(scale_dtype).replace("torch.", "")}
    return state, record


def _layers_prefix(model, layers) -> str:
    for name, module in model.named_modules():
        if module is layers:
            return f"{name}."
    raise ModelLoadError(f"{type(model).__name__}: decoder layers not found among its modules")


def drop_tied(model, state: dict) -> dict:
    """Without the aliases save_pretrained leaves out (a tied lm_head)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {k: v for k, v in state.items() if k not in tied}


# ---- writing and verifying ----
def write_checkpoint(out: Path, model, state: dict, record: dict) -> Path:
    """config.json (with the scheme) and model.safetensors in layer-contiguous order."""
    out = Path(out)
    model.config.save_pretrained(out)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config[CONFIG_KEY] = record
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    path = out / "model.safetensors"
    write_safetensors(path, state)
    return path


def write_safetensors(path: Path, tensors: dict) -> None:
    """A safetensors file whose tensors are grouped by decoder layer, so each layer is one byte range.

    safetensors' own writer orders tensors by dtype first, which would split a layer's int8 weights from
    its float scales. Within each group, wider dtypes come first, so every tensor stays aligned to its
    item size (groups are multiples of 8 bytes long whenever the integer weights are, e.g. K % 16 == 0),
    and to 64 bytes when every group's length is a multiple of 64 (typical sizes: multiples of 32).
    """
    writer = SafetensorsWriter(path, {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()})
    for name, t in tensors.items():
        writer.write(name, t.cpu())
    writer.close()


def linear_weight_names(model) -> set:
    """Names of the decoder-layer linear weights a scheme packs, e.g. ``model.layers.0.mlp.up_proj.weight``."""
    from llmcad.streaming.streamed import decoder_layers

    layers = decoder_layers(model)
    names = quantizable_linears(layers[0])
    if not names:
        raise ModelLoadError(f"{type(model).__name__}: its decoder layers have no nn.Linear to quantize")
    prefix = _layers_prefix(model, layers)
    return {f"{prefix}{i}.{name}.weight" for i in range(len(layers)) for name in names}


def packed_specs(shapes: dict, linears: set, scheme: str, group_size: int | None, scale_dtype, dtype) -> dict:
    """{name: (dtype, shape)} of the written tensors: ``linears`` packed, the rest in ``dtype``."""
    specs = {}
    for name, shape in shapes.items():
        if name not in linears:
            specs[name] = (dtype, tuple(shape))
            continue
        n, k = shape
        key = name[:-len(".weight")]
        if scheme == "int8":
            specs.update({f"{key}.qweight": (torch.int8, (n, k)), f"{key}.scales": (scale_dtype, (n,))})
        else:
            specs.update({f"{key}.qweight": (torch.uint8, (n, k // 2)),
                          f"{key}.scales": (scale_dtype, (n, k // group_size)),
                          f"{key}.zeros": (scale_dtype, (n, k // group_size))})
    return specs


def pack_transform(linears: set, scheme: str, group_size: int | None, scale_dtype):
    """(name, whole tensor) -> {written name: tensor}: ``linears`` packed as quantized_state packs them."""
    def transform(name, tensor):
        if name not in linears:
            return {name: tensor}
        packed = (quantize_int8(tensor, scale_dtype) if scheme == "int8"
                  else quantize_int4(tensor, group_size, scale_dtype))
        key = name[:-len(".weight")]
        return {f"{key}.{part}": t for part, t in packed.items()}
    return transform


def scheme_record(model, scheme: str, group_size: int | None, scale_dtype) -> dict:
    """The scheme record config.json carries (see quantized_state)."""
    from llmcad.streaming.streamed import decoder_layers

    return {"scheme": scheme, "group_size": group_size, "modules": quantizable_linears(decoder_layers(model)[0]),
            "scale_dtype": str(scale_dtype).replace("torch.", "")}


def verify_written(out: Path, state: dict, record: dict) -> None:
    """Every tensor present with its shape and dtype, all compared by value; each layer one byte range;
    config.json carries the scheme."""
    from safetensors import safe_open

    from llmcad.streaming.weights import load_index

    index = load_index(out)
    for name, tensor in state.items():
        index.check_holds(name, tensor)
    with safe_open(index.files[0], framework="pt") as f:
        for name, tensor in state.items():
            if not f.get_tensor(name).equal(tensor):
                raise WeightFileError(f"{index.files[0]}: {name!r} differs from the quantized model")
    for entry in index.tensors.values():
        if entry.offset % entry.torch_dtype.itemsize:
            raise WeightFileError(f"{index.files[0]}: {entry.name!r} is not aligned to its item size")
    for i in range(index.num_layers):
        if len(index.layer_ranges(i).ranges) != 1:
            raise WeightFileError(f"{index.files[0]}: layer {i} is not one contiguous byte range")
    written = json.loads((Path(out) / "config.json").read_text()).get(CONFIG_KEY)
    if written != record:
        raise WeightFileError(f"{out}/config.json: {CONFIG_KEY} is {written}, expected {record}")


def gguf_tensor_types(path: Path) -> list[str]:
    """Sorted names of the quantization types of a GGUF file's tensors (for the requantization note)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return []
    reader = GGUFReader(str(path))
    return sorted({t.tensor_type.name for t in reader.tensors})
