"""Per-generation counters and timers, reported as ``GenerationResult.stats`` (a JSON-ready dict)."""
from __future__ import annotations

import resource
import sys
import time
from collections import Counter
from contextlib import contextmanager

from llmcad import memory


def peak_rss_bytes() -> int:
    """Peak resident set size of this process: VmHWM (llmcad.memory), or ru_maxrss where there is no
    /proc (KiB on Linux, bytes on macOS; a child inherits its parent's, so only a fallback)."""
    peak = memory.peak_rss_bytes()
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class StatsRecorder:
    """Counts passes, accepted lengths and draft steps; times draft, target and the rest."""

    def __init__(self, streamed, prompt_tokens: int, policy_info: dict):
        self._streamed = streamed  # the StreamedTarget, None for a resident target
        self._bytes_at_start = self._bytes_read()
        self._start = time.perf_counter()
        self.prompt_tokens = prompt_tokens
        self.policy_info = policy_info
        self.seconds = {"draft": 0.0, "target": 0.0}
        self.accepted_hist = Counter()  # draft tokens accepted per pass -> passes
        self.target_passes = 0
        self.trace = []  # one dict per target pass
        # pipeline (llmcad.speculative.pipeline): provisional tokens drafted during verifications, how many of
        # them in passes a later pass followed (not the generation's last), how many seeded the next tree,
        # how many were dropped (a mismatch, or beyond the next tree's limits)
        self.provisional = {"provisional_drafted": 0, "provisional_followed": 0, "provisional_reused": 0,
                            "provisional_dropped": 0}

    def _bytes_read(self) -> int:
        """Bytes the target has read from storage so far (0 for a resident target)."""
        return int(self._streamed.bytes_read) if self._streamed is not None else 0

    @contextmanager
    def timed(self, part: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - t0

    def record_pass(self, tree_size: int, accepted_drafts: int, emitted: int, expected=None) -> None:
        """One target pass; ``expected``: the draft tokens the policy expected it to accept (None: no
        estimate)."""
        self.target_passes += 1
        self.accepted_hist[accepted_drafts] += 1
        self.trace.append({"pass": self.target_passes, "tree_tokens": tree_size,
                           "accepted": accepted_drafts, "emitted": emitted,
                           "t": round(time.perf_counter() - self._start, 6),
                           **({"expected_accepted": round(expected, 3)} if expected is not None else {})})

    def record_provisional(self, drafted: int, reused: int, dropped: int, followed: bool = True) -> None:
        """One pass's provisional tokens: ``followed``: a later pass follows this one."""
        for key, n in (("drafted", drafted), ("followed", drafted if followed else 0), ("reused", reused),
                       ("dropped", dropped)):
            self.provisional[f"provisional_{key}"] += n
        if self.trace:
            self.trace[-1].update(provisional=drafted, provisional_reused=reused)

    def finish(self, generated: int, draft_steps: int, stop_reason: str, extra: dict | None = None) -> dict:
        total = time.perf_counter() - self._start
        passes = self.target_passes
        streamed = {"streamed": self._streamed.stats()} if self._streamed is not None else {}
        return {
            **self.policy_info,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": generated,
            "target_passes": passes,
            "tokens_per_pass": generated / passes if passes else 0.0,
            "passes_per_token": passes / generated if generated else 0.0,
            "accepted_length_hist": {str(k): v for k, v in sorted(self.accepted_hist.items())},
            "draft_steps": draft_steps,
            **self.provisional,
            "provisional_reuse": reuse_fraction(self.provisional),
            "tokens_per_s": generated / total if total > 0 else 0.0,
            "bytes_read": self._bytes_read() - self._bytes_at_start,
            "peak_rss_bytes": peak_rss_bytes(),
            "time_s": {"draft": self.seconds["draft"], "target": self.seconds["target"],
                       "other": max(0.0, total - self.seconds["draft"] - self.seconds["target"]),
                       "total": total},
            "stop_reason": stop_reason,
            **(extra or {}),
            **streamed,
        }


def reuse_fraction(counts: dict):
    """Of the provisional tokens drafted in followed passes, the share that started the next tree (None:
    none drafted)."""
    followed = counts.get("provisional_followed") or 0
    return counts.get("provisional_reused", 0) / followed if followed else None


def provisional_line(stats: dict) -> str:
    """Provisional drafting: nodes grown during the target's reads and how many the next trees used."""
    share = stats.get("provisional_reuse")
    return (f"{stats.get('provisional_drafted', 0)} nodes grown during reads; of the "
            f"{stats.get('provisional_followed', 0)} in passes a later pass followed, "
            f"{stats.get('provisional_reused', 0)} started the next tree"
            f"{f' ({share:.0%})' if share is not None else ''}{beside_text(stats.get('draft_beside_compute'))}")


def beside_text(rule) -> str:
    """What the rule for drafting beside the target's compute decided, and on what slowdowns."""
    if not rule:
        return ""
    target, draft, bar = rule.get("target_slowdown"), rule.get("draft_slowdown"), rule.get("threshold")
    measured = (f" (beside each other the target computes {target:.2f}x and the draft {draft:.2f}x slower: pays for "
                f"path values above {bar:.2f}; {rule.get('steps_beside', 0)} steps beside)"
                if target is not None and draft is not None else "")
    return f"; draft beside compute: {rule.get('mode')}{measured}"


def format_size(nbytes) -> str:
    """Bytes in the largest decimal unit that keeps the number >= 1 (GB, MB, kB)."""
    nbytes = int(nbytes or 0)
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def policy_line(stats: dict) -> str:
    """What the cost rule chose and on what measurements: mean tree, size cap, and whether a pass of
    that tree is bound by its reads or by its compute (the fitted pass model)."""
    model = stats.get("target_pass_model_s") or {}
    fixed, per_token, reads = model.get("fixed") or 0.0, model.get("per_token") or 0.0, model.get("io_bound")
    mean = stats.get("mean_tree_tokens", 0.0)
    compute = fixed + per_token * mean
    bound = "reads" if reads is not None and reads > compute else "compute"
    cap, seen, slope_from = stats.get("pass_rows"), model.get("observations"), model.get("slope_from")
    fitted = f", fitted on {seen} passes" if seen is not None else ""
    if seen is not None and slope_from == "prior shape":
        source = "the prompt passes'" if model.get("probe_per_token") else "the prior's"
        fitted += f" (sizes too alike for a slope: {source} per-node share)"
    lookup = (f"; prompt lookup: {stats.get('lookup_nodes_accepted', 0)} of {stats.get('lookup_nodes_proposed', 0)} "
              "nodes accepted" if stats.get("prompt_lookup") else "")
    if stats.get("unverified_nodes"):
        lookup += f"; {stats['unverified_nodes']} grown nodes left unverified (not worth their pass share)"
    return (f"trees of {mean:.1f} nodes on average, size cap {stats.get('max_tree_tokens_chosen')}"
            f"{f' (memory allows {cap})' if cap else ''}; passes bound by {bound} (compute {fixed:.3f} s + "
            f"{per_token * 1e3:.2f} ms/node{f', reads {reads:.2f} s' if reads is not None else ''}"
            f"{fitted}){lookup}")


def draft_alone_differs(threads: dict):
    """The draft's threads when it drafts alone, where they differ from the pass's (else None)."""
    alone = threads.get("draft_alone")
    return alone if alone not in (None, threads.get("threads")) else None


def threads_line(threads: dict) -> str:
    """torch's compute threads, how they were chosen, and the other processes' load they were chosen on."""
    load = threads.get("other_load_cores")
    measured = f"; other processes used {load:.2f} cores while the models loaded" if load is not None else ""
    alone = draft_alone_differs(threads)
    alone = f", the draft alone {alone}" if alone is not None else ""
    return f"{threads.get('threads')} of {threads.get('usable_cores')} cores ({threads.get('chosen')}){alone}{measured}"


def summary(stats: dict, load_s: float | None = None) -> str:
    """A short timing summary of one generation, in the spirit of llama.cpp's (lines for stderr)."""
    seconds = stats.get("time_s", {})
    tokens, passes = stats.get("generated_tokens", 0), stats.get("target_passes", 0)
    rows = [
        ("generated", f"{tokens} tokens in {seconds.get('total', 0.0):.2f} s = {stats.get('tokens_per_s', 0.0):.2f} "
                      f"tokens/s ({stats.get('mode', '?')} mode, stopped by {stats.get('stop_reason') or 'nothing'})"),
        ("prompt", f"{stats.get('prompt_tokens', 0)} tokens, {stats.get('cached_tokens', 0)} of them reused from "
                   "the prompt cache"),
        ("target", f"{passes} passes, {stats.get('tokens_per_pass', 0.0):.2f} tokens per pass, "
                   f"{seconds.get('target', 0.0):.2f} s"),
        ("draft", f"{seconds.get('draft', 0.0):.2f} s"),
        ("read", f"{format_size(stats.get('bytes_read', 0))} of target weights from storage"),
        ("peak RSS", format_size(stats.get("peak_rss_bytes", 0))),
    ]
    if stats.get("cpu_threads"):
        rows.append(("threads", threads_line(stats["cpu_threads"])))
    if stats.get("pipeline"):
        rows.insert(4, ("provisional", provisional_line(stats)))
    if "max_tree_tokens_chosen" in stats:
        rows.insert(3, ("policy", policy_line(stats)))
    if load_s is not None:
        rows.insert(0, ("load", f"{load_s:.2f} s"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"llmcad: {name:<{width}} : {text}" for name, text in rows)
