"""``llmcad bench pass --variant NAME=DIR [--cap RATE]``: one streamed pass of several targets, one run.

Typically the bf16 target (``--target``) against its ``prepare --quantize int8`` / ``int4`` copies. Each
target is measured (see :mod:`llmcad.bench.pass_measure`) natively and, with ``--cap``, with the streamer
capped; every figure also appears as a ratio against ``--target`` in the same setting. The breakdown
adds ``layout_s``: converting the streamed int4 weights to the CPU kernel's layout, which a streamed
pass pays on top of the resident ``compute_s``; ``bound`` says which side dominates the pass.
Nothing outside llmcad.bench imports this module.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from llmcad.bench.pass_measure import measure
from llmcad.streaming.weights import load_index


def run_variants(args) -> int:
    targets = [(_label(args.target), args.target)] + [_parse_variant(v) for v in args.variant]
    settings = [("native", None)]
    if args.cap:
        from llmcad.streaming.budget import parse_rate

        rate = parse_rate(args.cap, what="--cap")
        settings.append((f"cap{rate / 1e6:g}", rate))
    records = []
    for setting, cap in settings:
        for name, path in targets:
            result = measure(path, memory_budget=args.memory_budget, draft=args.draft, tree_nodes=args.tree_nodes,
                             prefix_len=args.prefix, repeats=args.repeats, num_buffers=args.num_buffers,
                             backend=args.backend, dtype=args.dtype, seed=args.seed, bandwidth_cap=cap)
            result.update(variant=name, target=str(path), setting=setting, cap=cap, quantize=_scheme(path),
                          layout_s=layout_seconds(path, result["streamed_layer_ids"]))
            result["bound"] = "io" if result["io_s"] >= result["compute_s"] + result["layout_s"] else "compute"
            records.append(result)
            print(f"  {setting} {name}: wall {result['wall_s']:.3f}s", file=sys.stderr, flush=True)
    add_ratios(records)
    report = {"command": _command(), "commit": _commit(), "tree_nodes": args.tree_nodes, "records": records}
    print(json.dumps(report, indent=1) if args.json else markdown(report))
    return 0


def add_ratios(records: list) -> None:
    """``bytes_ratio`` and ``speedup`` (baseline wall / wall) against the first target of each setting."""
    base = {}
    for r in records:
        b = base.setdefault(r["setting"], r)
        r["bytes_ratio"] = r["bytes_per_pass"] / b["bytes_per_pass"] if b["bytes_per_pass"] else None
        r["speedup"] = b["wall_s"] / r["wall_s"]


def layout_seconds(path, streamed_layers) -> float:
    """Seconds to convert the int4 weights of ``streamed_layers`` (ids) to the CPU kernel's layout (0 for
    other schemes)."""
    from safetensors import safe_open

    from llmcad.streaming.quantized import cpu_int4_layout

    if _scheme(path) != "int4":
        return 0.0
    index = load_index(path)
    total = 0.0
    for i in streamed_layers:
        for entry in index.layers[i]:
            if entry.name.endswith(".qweight"):
                with safe_open(index.files[entry.file_index], framework="pt") as f:
                    packed = f.get_tensor(entry.name)
                start = time.perf_counter()
                cpu_int4_layout(packed)
                total += time.perf_counter() - start
    return total


def markdown(report: dict) -> str:
    lines = [f"`{report['command']}` (commit {report['commit']}, {report['tree_nodes']}-node tree)", "",
             "| setting | target | MiB/pass | bytes vs base | wall s | io s | compute s | int4 layout s | bound "
             "| speedup vs base |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["records"]:
        lines.append(f"| {r['setting']} | {r['variant']} | {r['bytes_per_pass'] / 2**20:.0f} | "
                     f"{r['bytes_ratio']:.3f}x | {r['wall_s']:.2f} | {r['io_s']:.2f} | {r['compute_s']:.2f} | "
                     f"{r['layout_s']:.2f} | {r['bound']} | {r['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def _parse_variant(text: str):
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--variant {text!r}: expected NAME=DIR")
    return name, path


def _scheme(path) -> str | None:
    from llmcad.models.quantize import CONFIG_KEY

    config = json.loads((Path(path) / "config.json").read_text())
    return (config.get(CONFIG_KEY) or {}).get("scheme")


def _label(path) -> str:
    scheme = _scheme(path)
    if scheme:
        return scheme
    dtype = load_index(path).layers[0][0].torch_dtype
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def _command() -> str:
    import shlex

    argv = sys.argv
    if argv[1:3] == ["bench", "pass"]:
        return shlex.join(["llmcad", *argv[1:]])
    return "llmcad bench pass (called from Python: " + shlex.join(argv) + ")"


def _commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
