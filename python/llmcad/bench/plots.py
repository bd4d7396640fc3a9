"""Bar charts of benchmark rows (matplotlib, Agg backend: no display needed), written as PNG.

Part of llmcad.bench (tools): may import the whole package; nothing outside llmcad.bench imports it.
"""
from __future__ import annotations

from pathlib import Path

CHARTS = (
    ("tokens_per_s", "tokens / s", "tokens_per_s.png"),
    ("ratio_vs_target_only", "speed-up over target-only (×)", "speedup.png"),
    ("tokens_per_pass", "tokens per target pass", "tokens_per_pass.png"),
    ("floor_ratio", "achieved / IO floor (lower is better)", "floor_ratio.png"),
)


def grouped_bars(rows: list, key: str, ylabel: str, path, title: str = "") -> Path:
    """One bar per row name, one colour per setting; missing values are left out. Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["name"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    width = 0.8 / max(1, len(settings))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(names)), 4.0))
    for j, setting in enumerate(settings):
        values = {r["name"]: r.get(key) for r in rows if r["setting"] == setting}
        xs = [i + (j - (len(settings) - 1) / 2) * width for i, n in enumerate(names) if values.get(n) is not None]
        ys = [values[n] for n in names if values.get(n) is not None]
        bars = ax.bar(xs, ys, width, label=setting)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if len(settings) > 1:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
    return path


def plot_rows(rows: list, out_dir, prefix: str = "e2e", title: str = "") -> list:
    """The standard charts as ``out_dir/{prefix}_{metric}.png``; a metric no row has is skipped. Returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [grouped_bars(rows, key, label, out_dir / f"{prefix}_{name}", title) for key, label, name in CHARTS
            if any(r.get(key) is not None for r in rows)]
