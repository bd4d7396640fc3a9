"""The model cache by name: ``llmcad models`` lists what is prepared there, ``llmcad models rm NAME``
removes one, and a model argument may be a name from that list as well as a path or a hub id.

The cache is ``$LLMCAD_HOME`` or ``~/.cache/llmcad`` (:func:`cache_dir`): the demo pair as
``<name>-<dtype>/`` (see :mod:`llmcad.models.fetch`), quantized copies under ``quantized/``, joined
GGUF sources under ``gguf/``.

Part of llmcad.models: may use llmcad.streaming; must not import llmcad.speculative, llmcad.bench or the engine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from llmcad.errors import ModelLoadError

STAMP = "llmcad-source.json"  # written by prepare: where a prepared model came from


def cache_dir() -> Path:
    return Path(os.environ.get("LLMCAD_HOME", Path.home() / ".cache" / "llmcad"))


@dataclass(frozen=True)
class CachedModel:
    name: str
    path: Path
    kind: str          # "model" (a prepared directory) or "gguf" (a joined source file)
    size_bytes: int
    weights: str       # "bfloat16", "int4 (group 128)", "gguf", ...
    source: str

    def as_dict(self) -> dict:
        return {"name": self.name, "path": str(self.path), "kind": self.kind, "size_bytes": self.size_bytes,
                "weights": self.weights, "source": self.source}


def cached_models(root: Path | None = None) -> list:
    """Every prepared model and GGUF source in the cache, sorted by name."""
    root = cache_dir() if root is None else root
    found = [_describe(d) for folder in (root, root / "quantized") if folder.is_dir()
             for d in sorted(folder.iterdir()) if _is_model_dir(d)]
    gguf = root / "gguf"
    if gguf.is_dir():
        found += [CachedModel(f.stem, f, "gguf", f.stat().st_size, "gguf", "joined from PyPI chunk packages")
                  for f in sorted(gguf.glob("*.gguf")) if f.is_file()]
    return sorted(found, key=lambda m: (m.kind != "model", m.name))


def find(name: str, root: Path | None = None):
    """The cached model called ``name``, else None."""
    return next((m for m in cached_models(root) if m.name == name), None)


def resolve(source) -> str:
    """A model argument as a loadable source: an existing path as given, a cache name as its directory,
    anything else unchanged (a hub id, or a missing path that loading reports)."""
    text = str(source)
    if Path(text).expanduser().exists() or "/" in text or text.startswith("."):
        return text
    model = find(text)
    if model is not None and model.kind == "model":
        return str(model.path)
    return text


def remove(name: str, root: Path | None = None) -> CachedModel:
    """Delete the cached model or GGUF called ``name``; ModelLoadError naming the choices if none is."""
    model = find(name, root)
    if model is None:
        names = ", ".join(m.name for m in cached_models(root)) or "none"
        raise ModelLoadError(f"no model called {name!r} in {cache_dir() if root is None else root} "
                             f"(cached: {names})")
    if model.kind == "gguf":
        model.path.unlink()
    else:
        shutil.rmtree(model.path)
    return model


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _describe(path: Path) -> CachedModel:
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return CachedModel(path.name, path, "model", size, _weights(path), _source(path))


def _weights(path: Path) -> str:
    from llmcad.streaming.quantized import CONFIG_KEY

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return "unreadable config.json"
    scheme = config.get(CONFIG_KEY)
    if isinstance(scheme, dict):
        group = scheme.get("group_size")
        return f"{scheme.get('scheme', '?')}" + (f" (group {group})" if group else "")
    return str(config.get("torch_dtype") or config.get("dtype") or "?")


def _source(path: Path) -> str:
    try:
        return str(json.loads((path / STAMP).read_text()).get("source", "?"))
    except (OSError, ValueError, AttributeError):
        return "?"


# ------------------------------------------------------------------ the `llmcad models` command
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("List the models prepared in the cache ($LLMCAD_HOME or ~/.cache/llmcad), or remove one. "
                     "Any name listed here can be given to --draft/--target.")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.add_parser("list", help="list the cached models (the default)")
    rm = sub.add_parser("rm", help="remove a cached model or GGUF file")
    rm.add_argument("name", nargs="+", help="name(s) as `llmcad models` lists them")
    p.add_argument("--json", action="store_true", help="print the list as JSON")


def run(args: argparse.Namespace) -> int:
    if args.action == "rm":
        for name in args.name:
            model = remove(name)
            print(f"removed {model.name} ({_size(model.size_bytes)}, {model.path})")
        return 0
    models = cached_models()
    if args.json:
        print(json.dumps([m.as_dict() for m in models], indent=1))
        return 0
    if not models:
        print(f"no models in {cache_dir()} (`llmcad demo` fetches the demo pair; `llmcad prepare` imports others)",
              file=sys.stderr)
        return 0
    rows = [("NAME", "SIZE", "WEIGHTS", "SOURCE")] + [(m.name, _size(m.size_bytes), m.weights, m.source)
                                                     for m in models]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    total = sum(m.size_bytes for m in models)
    print(f"{len(models)} entries, {_size(total)} in {cache_dir()}")
    return 0


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.0f} MB"
