"""Spec-Bench-style answers of a row: one JSONL line per question, as Spec-Bench's evaluation/speed.py reads.

Per line: ``question_id``, ``category``, ``answer_id``, ``model_id`` and ``choices`` (one choice:
``index``, ``turns`` (the generated text), ``decoding_steps``, ``new_tokens``, ``wall_time`` (seconds)
and ``accept_lengths``: tokens each target pass emitted). Files go to
``OUT/specbench/<workload>/<setting>/<row>.jsonl``; ``target-only.jsonl`` is speed.py's ``--base-path``.

Part of llmcad.bench (tools): may import the whole package; nothing outside llmcad.bench imports it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path


def lines(record: dict, workload: dict, decode) -> list:
    """The JSONL lines of one row's raw record; ``decode`` turns token ids into text."""
    model_id = f"llmcad-bench/{record['name']}/{record['setting']}"
    out = []
    for i, stats in enumerate(record.get("per_prompt") or []):
        tokens = record["tokens"][i]
        accepted = stats.get("accept_lengths") or []
        out.append({"question_id": workload["question_ids"][i], "category": workload["categories"][i],
                    "answer_id": f"{record['name']}-{record['setting']}-{workload['question_ids'][i]}",
                    "model_id": model_id,
                    "choices": [{"index": 0, "turns": [decode(tokens)], "decoding_steps": [stats.get("passes")],
                                 "new_tokens": [len(tokens)], "wall_time": [stats["seconds"]],
                                 "accept_lengths": accepted}],
                    "tstamp": time.time()})
    return out


def write(out: Path, record: dict, workload: dict, decode) -> Path | None:
    """Write one row's file (nothing for a failed row); returns its path."""
    if record.get("error") or not record.get("per_prompt"):
        return None
    path = Path(out) / "specbench" / workload["name"] / record["setting"] / f"{record['name']}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines(record, workload, decode)), encoding="utf-8")
    return path
