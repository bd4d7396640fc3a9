"""Quantized rows of ``llmcad bench e2e --quantize int8,int4``: ``<row>-int8`` / ``<row>-int4``.

Each llmcad (engine) row gets a copy per scheme whose options carry ``quantize``; the run prepares the
target once per scheme (``llmcad prepare --quantize``, kept under ``--out`` and reused while its source
and scheme match), and the row process swaps that directory in for the target (:func:`resolve_job`).
Nothing outside llmcad.bench imports this module.
"""
from __future__ import annotations

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
    from llmcad.models.quantize import quantized_copy

    return {scheme: str(quantized_copy(target, scheme, Path(out) / f"quantized-target-{scheme}"))
            for scheme in schemes}


def resolve_job(job: dict) -> dict:
    """The job a quantized row runs: its scheme's target directory, ``quantize`` out of the engine options."""
    scheme = job["row"]["options"].get("quantize")
    if not scheme:
        return job
    options = {k: v for k, v in job["row"]["options"].items() if k != "quantize"}
    return dict(job, target=job["quantized_targets"][scheme], row=dict(job["row"], options=options))
