"""Rows on disk: ``rows.jsonl`` in the output folder, one line per row as it finishes.

Each line is ``{"key", "record"}``: ``key`` is a digest of everything the row's result depends on (models,
prompts, limits, the row's options), ``record`` its raw record. A rerun with the same output folder
takes a finished row (no ``error``) whose key matches instead of running it again; any change of
configuration gives new keys, so nothing measured under another configuration is reused. A line cut
short by a kill is skipped.

Part of llmcad.bench (tools): may import the whole package; nothing outside llmcad.bench imports it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

FILE = "rows.jsonl"


def row_key(config: dict) -> str:
    """A digest of ``config`` (JSON-ready values; key order does not matter)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:32]


class RowLog:
    """The rows of ``out/rows.jsonl``: :meth:`finished` looks one up, :meth:`append` adds one (flushed)."""

    def __init__(self, out):
        self.path = Path(out) / FILE
        self._finished: dict = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line the previous run did not finish writing
                if isinstance(entry, dict) and not (entry.get("record") or {}).get("error", True):
                    self._finished[entry["key"]] = entry["record"]

    def finished(self, key: str) -> dict | None:
        """The finished record of ``key`` from an earlier run, or None."""
        return self._finished.get(key)

    def append(self, key: str, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "record": record}) + "\n")
            f.flush()
            os.fsync(f.fileno())
