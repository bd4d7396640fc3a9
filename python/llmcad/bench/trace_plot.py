"""``llmcad trace-plot FILE -o timeline.png``: draw a trace written by ``generate --trace`` (Chrome
trace-event JSON, see llmcad.trace) as one row of bars per lane (matplotlib, Agg backend).

Part of llmcad.bench (tools): may import the whole package; nothing outside llmcad.bench imports it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmcad.errors import LLMCadError

COLORS = {"IO": "tab:orange", "target compute": "tab:blue", "draft": "tab:green", "verify/commit": "tab:purple"}
SPECIAL = {"provisional": "tab:olive", "io wait": "lightgray", "wait draft step": "tab:red"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Draw a timeline written by `llmcad generate --trace FILE` (Chrome trace-event JSON): one row "
                     "of bars per lane (IO, target compute, draft, verify/commit).")
    p.add_argument("trace", metavar="FILE", help="trace JSON written by `llmcad generate --trace FILE`")
    p.add_argument("-o", "--output", default="timeline.png", help="image to write (default timeline.png)")
    p.add_argument("--start-ms", type=float, default=None, help="show from this time (ms)")
    p.add_argument("--end-ms", type=float, default=None, help="show up to this time (ms)")
    p.add_argument("--title", default=None)


def run(args) -> int:
    lanes = load_lanes(args.trace)
    plot(lanes, args.output, start_ms=args.start_ms, end_ms=args.end_ms, title=args.title or Path(args.trace).name)
    print(f"wrote {args.output}")
    return 0


def load_lanes(path) -> dict:
    """Lane name -> [(start_ms, duration_ms, event name)], lanes in their sort order."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LLMCadError(f"{path}: not a readable trace JSON ({exc})") from exc
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise LLMCadError(f"{path}: no traceEvents list (expected Chrome trace-event JSON from `generate --trace`)")
    names = {e["tid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
    lanes = {names[tid]: [] for tid in sorted(names)}
    for e in events:
        if e.get("ph") == "X":
            lane = names.get(e.get("tid"), f"tid {e.get('tid')}")
            lanes.setdefault(lane, []).append((e["ts"] / 1e3, e.get("dur", 0) / 1e3, e.get("name", "")))
    return lanes


def _color(lane: str, name: str) -> str:
    for prefix, color in SPECIAL.items():
        if name.startswith(prefix):
            return color
    return COLORS.get(lane, "tab:gray")


def plot(lanes: dict, output, *, start_ms=None, end_ms=None, title=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = list(lanes)[::-1]  # first lane on top
    fig, ax = plt.subplots(figsize=(14, 1.0 + 0.7 * len(rows)))
    for y, lane in enumerate(rows):
        spans = [(s, max(d, 1e-3), n) for s, d, n in lanes[lane]
                 if (start_ms is None or s + d >= start_ms) and (end_ms is None or s <= end_ms)]
        if spans:
            ax.broken_barh([(s, d) for s, d, _ in spans], (y - 0.4, 0.8),
                           facecolors=[_color(lane, n) for _, _, n in spans], edgecolor="white", linewidth=0.3)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("time (ms)")
    if start_ms is not None or end_ms is not None:
        ax.set_xlim(left=start_ms, right=end_ms)
    ax.set_title(title or "llmcad timeline")
    legend = [Patch(color=c, label=k) for k, c in COLORS.items()] + [Patch(color=c, label=k) for k, c in SPECIAL.items()]
    ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.25 if len(rows) > 2 else -0.4),
              ncol=len(legend), fontsize="small", frameon=False)
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
