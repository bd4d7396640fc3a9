"""Quantized rows of ``llmcad bench e2e --quantize int8,int4``: ``<row>-int8`` / ``<row>-int4``.

Each llmcad (engine) row gets a copy per scheme whose options carry ``quantize``; the run prepares the
target once per scheme (``llmcad prepare --quantize``, kept under ``--out`` and reused while its source
and scheme match), and the row process swaps that directory in for the target (:func:`resolve_job`).
"""
from __future__ import annotations

import json
from pathlib import Path

SCHEMES = ("int8", "int4")


def parse_schemes(text: str | None) -> list:
    schemes = [s.strip() for s in (text or "").split(",") if s.strip()]
    unknown = sorted(set(schemes) - set(SCHEMES))
    if unknown:
        raise ValueError(f"--quantize {text!r}: unknown scheme(s) {', '.join(unknown)}; choose from int8, int4")
    return schemes


def quantized_rows(rows: list, schemes: list) -> list:
    """The engine rows again, once per scheme, named ``<row>-<scheme>`` with ``quantize`` in the options."""
    from dataclasses import replace

    return [replace(row, name=f"{row.name}-{scheme}", options={**row.options, "quantize": scheme})
            for scheme in schemes for row in rows if row.runner == "engine"]


def prepare_targets(target, schemes: list, out: Path) -> dict:
    """scheme -> directory of the target prepared with that scheme (reused when already there)."""
    from llmcad.models.prepare import prepare
    from llmcad.models.quantize import CONFIG_KEY

    from llmcad.streaming.weights import load_index

    layer = load_index(target).layers[0]
    dtype = str(next(t.torch_dtype for t in layer if t.torch_dtype.is_floating_point))
    inputs = {t.shape[1] for t in layer if len(t.shape) == 2}
    group = next((g for g in (128, 64, 32) if all(k % g == 0 for k in inputs)), 32)  # tiny models: < 128
    dirs = {}
    for scheme in schemes:
        dest = Path(out) / f"quantized-target-{scheme}"
        stamp = dest / "llmcad-source.json"
        source = {"source": str(Path(target).resolve()), "scheme": scheme, "group_size": group}
        config = dest / "config.json"
        if not (stamp.is_file() and json.loads(stamp.read_text()) == source and config.is_file()
                and CONFIG_KEY in json.loads(config.read_text())):
            prepare(target, dest, dtype.replace("torch.", ""), quantize=scheme,
                    group_size=group if scheme == "int4" else None)
            stamp.write_text(json.dumps(source))
        dirs[scheme] = str(dest)
    return dirs


def resolve_job(job: dict) -> dict:
    """The job a quantized row runs: its scheme's target directory, ``quantize`` out of the engine options."""
    scheme = job["row"]["options"].get("quantize")
    if not scheme:
        return job
    options = {k: v for k, v in job["row"]["options"].items() if k != "quantize"}
    return dict(job, target=job["quantized_targets"][scheme], row=dict(job["row"], options=options))
