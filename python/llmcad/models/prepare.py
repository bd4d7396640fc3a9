"""``llmcad prepare``: import a GGUF file or an HF checkpoint into a streamable safetensors directory.

The output holds ``config.json``, the tokenizer and safetensors weights in one dtype; every decoder
layer is then a few contiguous byte ranges that :mod:`llmcad.streaming.weights` indexes for streaming.
The weights are converted tensor by tensor (:mod:`llmcad.models.convert`: memory does not grow with the
model); a source transformers would convert otherwise is loaded whole. A tied model stays tied.

Nothing is destroyed or left half-made: the model is written into a sibling temporary directory,
verified, then renamed into place (an existing output is replaced only with ``force``, by a second
rename). An interrupted run leaves the old output or none; its temporary directory is removed on
SIGINT/SIGTERM, and swept by the next run after a SIGKILL.

Part of llmcad.models: may use llmcad.streaming; must not import llmcad.speculative, llmcad.bench or the engine.
"""
from __future__ import annotations

import argparse
import errno
import gc
import json
import os
import shutil
import signal
import struct
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from llmcad.errors import ModelLoadError, OutputError, WeightFileError
from llmcad.progress import step

DTYPES = ("bfloat16", "float16", "float32")
_CHECKED_TENSORS = 4  # tensors compared value-for-value after writing


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="HF checkpoint directory, a directory holding a GGUF file, a .gguf file, or a "
                        "name `llmcad models` lists")
    parser.add_argument("-o", "--out", required=True, help="output directory (created; an existing non-empty one "
                        "only with --force)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory (atomically, "
                        "once the new model is written and verified)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype of the written weights")
    parser.add_argument("--gguf-file", default=None, help="name of the GGUF file inside SRC")
    parser.add_argument("--quantize", choices=("int8", "int4"), default=None,
                        help="store decoder-layer linears as int8 (per channel) or int4 (per group)")
    parser.add_argument("--group-size", type=int, default=None,
                        help="int4 group size: 32, 64, 128 (default) or 256")
    parser.add_argument("--tie-embeddings", action="store_true",
                        help="GGUF whose output and embedding tensors differ only by quantization: store one "
                        "(the output's values) and tie them; for a draft (lossless: only the target decides "
                        "the output)")


def run(args) -> int:
    from llmcad.models.catalog import resolve

    with _sigterm_as_exit():
        out = prepare(resolve(args.src), args.out, args.dtype, gguf_file=args.gguf_file, quantize=args.quantize,
                      group_size=args.group_size, force=args.force, tie_embeddings=args.tie_embeddings)
    print(f"prepared {out}")
    return 0


def prepare(src, out, dtype: str = "bfloat16", gguf_file: str | None = None, quantize: str | None = None,
            group_size: int | None = None, force: bool = False, tie_embeddings: bool = False) -> Path:
    """Load ``src`` (GGUF via ``gguf_file`` or a checkpoint), write it to ``out`` in ``dtype``, verify.

    ``quantize``: "int8" or "int4" (``group_size``) stores the decoder-layer linears packed
    (llmcad.models.quantize); the float tensors and the scales are in ``dtype``. ``tie_embeddings``: a
    GGUF's output and embedding tensors stored once and tied (llmcad.models.convert.gguf_source).

    Returns the output directory. Raises ModelLoadError when the source cannot be loaded or ``out`` is
    the source, lies inside it or holds it; WeightFileError when the written files do not match the
    model; OutputError when ``out`` is not empty (without ``force``) or cannot be written (disk full,
    permission denied). ``out`` is only ever replaced whole, after the new model was verified.
    """
    src, gguf_file = _resolve_source(Path(src), gguf_file)
    if dtype not in DTYPES:
        raise ModelLoadError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if quantize is not None:
        from llmcad.models.quantize import check_scheme

        group_size = check_scheme(quantize, group_size)
    out = Path(out)
    _sweep(out)  # first: an old output a killed run had moved aside comes back, and is checked as any
    checked = _check_output(src / gguf_file if gguf_file else src, out, force)  # a GGUF source is the file
    if gguf_file:
        check_gguf(src / gguf_file)
    temp = _sibling(out, "tmp", os.getpid())
    try:
        tokenizer = _load_tokenizer(src, gguf_file)
        source = _open_source(src, gguf_file, dtype, tie_embeddings)
        if source is not None:
            with step("prepare: writing the tokenizer"):
                _keep_end_of_generation(source.model, tokenizer, src / gguf_file if gguf_file else None)
                temp.mkdir(parents=True)
                tokenizer.save_pretrained(temp)
                del tokenizer  # not needed to convert the weights (a real vocabulary holds hundreds of MB)
                gc.collect()
            _write_converted(source, temp, out, quantize, group_size)
            _write_stamp(temp, src / gguf_file if gguf_file else src, dtype, quantize, group_size)
            _swap_into_place(temp, out, checked)
            if source.note:
                print(f"note: {source.note}")
            return _requantized_note(out, src, gguf_file, quantize, source.tensor_types)
        if tie_embeddings:
            raise ModelLoadError(f"--tie-embeddings: {src / (gguf_file or '')} is not a GGUF file prepare converts "
                                 "tensor by tensor")
        model = _load(src, gguf_file, dtype, tokenizer)
        with step(f"prepare: writing {quantize or dtype} weights to {out}"):
            temp.mkdir(parents=True)
            if quantize is not None:
                from llmcad.models import quantize as quant

                state, record = quant.quantized_state(model, quantize, group_size, model.dtype)
                state = quant.drop_tied(model, state)
                quant.write_checkpoint(temp, model, state, record)
            else:
                model.save_pretrained(temp)
            tokenizer.save_pretrained(temp)
        if quantize is not None:
            quant.verify_written(temp, state, record)
        else:
            verify(temp, model, dtype)
        _write_stamp(temp, src / gguf_file if gguf_file else src, dtype, quantize, group_size)
        _swap_into_place(temp, out, checked)
    except OSError as exc:
        if isinstance(exc, OutputError):
            raise
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return _requantized_note(out, src, gguf_file, quantize)


def _requantized_note(out: Path, src: Path, gguf_file, quantize, tensor_types=()) -> Path:
    """``out``, after a note when a GGUF's quantized tensors were requantized (``tensor_types``: the
    GGUF's type names when known, else read from the file)."""
    if quantize is not None and gguf_file:
        from llmcad.models import quantize as quant

        types = "/".join(tensor_types or quant.gguf_tensor_types(src / gguf_file)) or "its types"
        print(f"note: {gguf_file} ({types}) was dequantized and requantized to {quantize}: "
              "not bit-exact to the GGUF's own quantization")
    return out


def _open_source(src: Path, gguf_file, dtype: str, tie_embeddings: bool):
    """The tensor-by-tensor source (llmcad.models.convert), or None: load the whole model instead."""
    import torch

    from llmcad.models import convert

    what = src / gguf_file if gguf_file else src
    try:
        with step(f"prepare: reading the layout of {what}"):
            if gguf_file:
                return convert.gguf_source(src / gguf_file, getattr(torch, dtype), tie_embeddings)
            return convert.safetensors_source(src, getattr(torch, dtype)) if any(src.glob("*.safetensors")) else None
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ModelLoadError(f"{what}: cannot load model: {exc}") from exc


def _write_converted(source, temp: Path, out: Path, quantize, group_size) -> None:
    """Write ``source`` tensor by tensor into ``temp`` (weights, config, generation config), then verify
    every tensor's bytes and that config and weights agree."""
    from llmcad.models import convert
    from llmcad.models.loading import check_checkpoint

    model = source.model
    try:
        with step(f"prepare: converting to {quantize or source.dtype} tensor by tensor into {out}", spinner=False):
            if quantize is not None:
                from llmcad.models import quantize as quant

                linears = quant.linear_weight_names(model)
                quant.check_shapes(model.model.layers[0], quantize, group_size)
                specs = quant.packed_specs(source.shapes, linears, quantize, group_size, source.dtype, source.dtype)
                digests = convert.write_source(source, temp, quant.pack_transform(linears, quantize, group_size,
                                                                                  source.dtype), specs)
                record = quant.scheme_record(model, quantize, group_size, source.dtype)
            else:
                digests, record = convert.write_source(source, temp), None
            _save_config(model, temp, record)
    finally:
        source.close()
    with step("prepare: verifying"):
        convert.verify_digests(temp, digests)
        check_checkpoint(temp)


def _save_config(model, out: Path, record: dict | None) -> None:
    """config.json (with the quantization record) and generation_config.json, as save_pretrained writes them."""
    from llmcad.models.quantize import CONFIG_KEY

    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out)
    if record is not None:
        path = out / "config.json"
        config = json.loads(path.read_text())
        config[CONFIG_KEY] = record
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if model.can_generate():
        model.generation_config.save_pretrained(out)


_MARK = ".llmcad-"  # temporary siblings: .<name>.llmcad-tmp-<pid> (being written), .<name>.llmcad-old-<pid>


def _sibling(out: Path, kind: str, pid: int) -> Path:
    return out.parent / f".{out.name}{_MARK}{kind}-{pid}"


def _check_output(src: Path, out: Path, force: bool):
    """Refuse an output that would destroy the source or someone's files. Returns the identity
    (device, inode) of the non-empty directory ``force`` allows to replace, else None."""
    source, target = src.resolve(), out.resolve()
    if target == source or source in target.parents:
        raise ModelLoadError(f"--out {out}: is the source {'directory ' if source.is_dir() else ''}or lies inside "
                             "it; choose another output")
    if target in source.parents:
        raise ModelLoadError(f"--out {out}: holds the source {src}; replacing it would delete the source")
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise OutputError(f"--out {out}: directory is not empty; pass --force (force=True) to replace it "
                              "once the new model is written and verified")
        st = out.stat()
        return st.st_dev, st.st_ino
    return None


def _sweep(out: Path) -> None:
    """Undo what a run killed outright (SIGKILL, power loss) left next to ``out``: its temporary
    directory, and an old output moved aside but not yet replaced (put back)."""
    if not out.parent.is_dir():
        return
    for path in out.parent.glob(f".{out.name}{_MARK}*-*"):
        kind, _, pid = path.name[len(f".{out.name}{_MARK}"):].partition("-")
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not out.exists():
            os.rename(path, out)  # killed between the two renames: the old output comes back
        else:
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _swap_into_place(temp: Path, out: Path, checked) -> None:
    """Rename the verified ``temp`` to ``out``. Only an absent or empty ``out`` is replaced (rename
    itself refuses a non-empty directory, atomically), or, with ``force``, the very directory that was
    checked (``checked``: its device and inode), which is moved aside first, then removed. A directory
    that appeared or was swapped in while prepare ran is never touched."""
    old = None
    if checked is not None and out.is_dir():
        old = _sibling(out, "old", os.getpid())
        os.rename(out, old)
        st = old.stat()
        if (st.st_dev, st.st_ino) != checked:
            raise OutputError(f"--out {out}: was replaced by another directory while prepare ran; left it as it "
                              f"is{_put_back(old, out)} (--force replaces only the directory it checked)")
    try:
        os.rename(temp, out)
    except OSError as exc:
        kept = _put_back(old, out) if old is not None else ""
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise OutputError(f"--out {out}: a non-empty directory appeared there while prepare ran; left it as "
                              f"it is{kept}") from None
        if exc.errno == errno.ENOTDIR:
            raise OutputError(f"--out {out}: a file appeared there while prepare ran; left it as it is{kept}") from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _put_back(old: Path, out: Path) -> str:
    """Rename a moved-aside output back to ``out``; "" when done, else where it stays (something took
    its place meanwhile; the next run's sweep restores it once ``out`` is gone)."""
    try:
        os.rename(old, out)
        return ""
    except OSError:
        return f" (the directory that was there is now {old})"


@contextmanager
def _sigterm_as_exit():
    """SIGTERM unwinds like Ctrl-C (cleanups run), then exits with status 143."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        sys.exit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _resolve_source(src: Path, gguf_file):
    if src.is_file() and src.suffix == ".gguf" and gguf_file is None:
        return src.parent, src.name
    if not src.is_dir():
        raise ModelLoadError(f"{src}: source not found (need a checkpoint directory or a .gguf file)")
    if gguf_file is not None and not (src / gguf_file).is_file():
        raise ModelLoadError(f"{src / gguf_file}: GGUF file not found")
    return src, gguf_file


def check_gguf(path: Path) -> None:
    """ModelLoadError naming ``path`` when its header, metadata or tensor table cannot be parsed or its
    tensors run past its end (truncated, corrupt, not GGUF), before any reader fails with its own words
    (``unpack_from requires...``). The header is walked as the conversion walks it, keeping no metadata."""
    from llmcad.models.convert import read_gguf_tensors

    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            magic, version = f.read(4), struct.unpack("<I", f.read(4).ljust(4, b"\0"))[0]
        if magic == b"GGUF" and version not in (2, 3):
            raise ValueError(f"GGUF version {version}; versions 2 and 3 are supported")
        _, tensors, _ = read_gguf_tensors(path)  # views of a read-only map, released with them
        for tensor in tensors:
            if tensor.data_offset + tensor.n_bytes > size:
                raise ValueError(f"tensor {tensor.name!r} ends at byte {tensor.data_offset + tensor.n_bytes}, the "
                                 f"file has {size} (truncated)")
    except struct.error:
        raise ModelLoadError(f"{path}: not a valid GGUF file (truncated or corrupt: its header or metadata runs "
                             f"past the end of the file, {size} bytes)") from None
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, MemoryError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not a valid GGUF file ({' '.join(str(exc).split())[:300]})") from None


def _load_tokenizer(src: Path, gguf_file):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    what = src / gguf_file if gguf_file else src
    try:
        with step(f"prepare: reading the tokenizer of {what}"):
            return AutoTokenizer.from_pretrained(src, trust_remote_code=False, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"{what}: cannot load model: {exc}") from exc


def _load(src: Path, gguf_file, dtype: str, tokenizer):
    """The whole model in memory (sources :mod:`llmcad.models.convert` does not convert tensor by tensor)."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    what = src / gguf_file if gguf_file else src
    try:
        if gguf_file:  # unpack every weight now (llmcad streams plain tensors), so no GGUF kernel is involved
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        with step(f"prepare: loading {what} as {dtype}", spinner=not gguf_file):  # a GGUF load has its own bar
            model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype), trust_remote_code=False,
                                                         **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"{what}: cannot load model: {exc}") from exc
    # A GGUF import is dequantized already; saving must not claim a quantization.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = getattr(torch, dtype)
    _keep_end_of_generation(model, tokenizer, src / gguf_file if gguf_file else None)
    return model.eval()


def _keep_end_of_generation(model, tokenizer, gguf_path) -> None:
    """Store every end-of-generation id the source defines in the generation config (a GGUF import
    keeps only the metadata's eos id; see llmcad.models.eos)."""
    from llmcad.models.eos import end_of_generation_ids

    ids = end_of_generation_ids(model, tokenizer, gguf_path)
    if ids:
        model.generation_config.eos_token_id = ids if len(ids) > 1 else ids[0]


def verify(out: Path, model, dtype: str | None = None) -> None:
    """Re-read the written headers: every tensor present with its shape and dtype; a few by value.

    With ``dtype``, every floating tensor must be in it (a GGUF import left packed would not be).
    """
    from safetensors import safe_open

    from llmcad.streaming.weights import load_index

    index = load_index(out)
    state = model.state_dict()
    expected = {k: v for k, v in state.items() if k in index.tensors or not _is_tied(model, k)}
    for name, tensor in tqdm(expected.items(), desc="prepare: verifying", unit="tensor", leave=False):
        entry = index.check_holds(name, tensor)
        if dtype is not None and str(entry.torch_dtype) != f"torch.{dtype}":
            raise WeightFileError(
                f"{index.files[entry.file_index]}: {name!r} written as {entry.dtype}, not {dtype} "
                "(weights left packed or unconverted)")
    names = sorted(expected)
    picks = {names[int(i * (len(names) - 1) / max(1, _CHECKED_TENSORS - 1))] for i in range(_CHECKED_TENSORS)}
    for name in picks:
        entry = index.tensors[name]
        with safe_open(index.files[entry.file_index], framework="pt") as f:
            if not f.get_tensor(name).equal(expected[name]):
                raise WeightFileError(f"{index.files[entry.file_index]}: {name!r} differs from the model")


def _is_tied(model, key: str) -> bool:
    """True when ``key`` is a tied alias that save_pretrained legitimately drops."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return key in tied


def _write_stamp(directory: Path, source, dtype: str, quantize, group_size) -> None:
    """Where the model came from and how it was written (``llmcad models`` shows it)."""
    record = {"source": str(Path(source).resolve()), "dtype": dtype}
    if quantize is not None:
        record.update(scheme=quantize, group_size=group_size)
    (directory / "llmcad-source.json").write_text(json.dumps(record))


def quantized_copy(target, scheme: str, dest) -> Path:
    """``dest`` holding ``target`` prepared with ``scheme`` (prepared now unless it already is).

    The float dtype is the target's; the int4 group size is the largest of 128, 64, 32 that divides every
    linear's in_features (tiny models have fewer than 128). A stamp file records source and scheme.
    """
    from llmcad.models.quantize import CONFIG_KEY
    from llmcad.streaming.weights import load_index

    layer = load_index(target).layers[0]
    dtype = str(next(t.torch_dtype for t in layer if t.torch_dtype.is_floating_point)).replace("torch.", "")
    inputs = {t.shape[1] for t in layer if len(t.shape) == 2}
    group = next((g for g in (128, 64, 32) if all(k % g == 0 for k in inputs)), 32) if scheme == "int4" else None
    dest = Path(dest)
    stamp = dest / "llmcad-source.json"
    source = {"source": str(Path(target).resolve()), "scheme": scheme, "group_size": group}
    config = dest / "config.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == source and config.is_file()
            and CONFIG_KEY in json.loads(config.read_text())):
        prepare(target, dest, dtype, quantize=scheme, group_size=group)
        stamp.write_text(json.dumps(source))
    return dest
