"""Quantized rows of ``llmcad bench e2e --quantize int8,int4``: ``<row>-int8`` / ``<row>-int4``.

Each llmcad (engine) row has a copy per scheme whose options carry ``quantize`` (``--rows`` may name
them); the run prepares the target once per scheme a row uses (``llmcad prepare --quantize``, kept
under ``--out`` and reused while its source and scheme match), and the row process swaps that
directory in for the target (:func:`resolve_job`).
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


def split_name(name: str, engine_names) -> tuple[str, str] | None:
    """(engine row, scheme) of a quantized row name such as ``llmcad-int4``; None for any other name."""
    base, sep, scheme = name.rpartition("-")
    return (base, scheme) if sep and scheme in SCHEMES and base in engine_names else None


def check_names(wanted: list, engine_names, schemes: list) -> None:
    """A quantized name in ``--rows`` needs its scheme in ``--quantize``."""
    missing = [n for n in wanted if (split := split_name(n, engine_names)) and split[1] not in schemes]
    if missing:
        needed = ",".join(dict.fromkeys(split_name(n, engine_names)[1] for n in missing))
        raise ValueError(f"--rows: row(s) {', '.join(missing)} need --quantize {needed} (--quantize gives: "
                         f"{','.join(schemes) or 'nothing'})")


def quantized_rows(rows: list, schemes: list) -> list:
    """The engine rows again, once per scheme, named ``<row>-<scheme>`` with ``quantize`` in the options."""
    from dataclasses import replace

    return [replace(row, name=f"{row.name}-{scheme}", options={**row.options, "quantize": scheme})
            for scheme in schemes for row in rows if row.runner == "engine"]


def schemes_used(rows: list) -> list:
    """The schemes the rows run, in order of appearance."""
    return list(dict.fromkeys(r.options["quantize"] for r in rows if r.options.get("quantize")))


def prepare_targets(target, schemes: list, out: Path) -> dict:
    """scheme -> directory of the target prepared with that scheme (reused when already there)."""
    from llmcad.models.prepare import quantized_copy

    return {scheme: str(quantized_copy(target, scheme, Path(out) / f"quantized-target-{scheme}"))
            for scheme in schemes}


def resolve_job(job: dict) -> dict:
    """The job a quantized row runs: its scheme's target directory, ``quantize`` out of the engine options."""
    scheme = job["row"]["options"].get("quantize")
    if not scheme:
        return job
    options = {k: v for k, v in job["row"]["options"].items() if k != "quantize"}
    return dict(job, target=job["quantized_targets"][scheme], row=dict(job["row"], options=options))
