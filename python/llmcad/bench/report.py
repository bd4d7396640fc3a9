"""Metrics, JSON and markdown of the end-to-end benchmark (``llmcad bench e2e``).

A row's raw record (written by the row's child process) holds its generated tokens per prompt and
totals; :func:`summarize` turns it into the metrics, :func:`compare` adds the ratio and the
token-for-token agreement with the ``target-only`` row of the same setting.

IO floor: a token cannot come faster than the bytes streamed for it can be read,
``floor s/token = (bytes per pass / raw O_DIRECT bandwidth) / tokens per pass = bytes per token / bandwidth``
(under a cap the bandwidth is ``min(raw, cap)``); ``floor_ratio`` = achieved s/token / floor. A row
whose floor is under ``HELD_SHARE`` of its achieved s/token (a peer that holds its weights and reads
a few page faults a token) has none.

Part of llmcad.bench (tools): may import the whole package; nothing outside llmcad.bench imports it.
"""
from __future__ import annotations

import os
import platform

from llmcad.stats import beside_text, draft_alone_differs, reuse_fraction

BASELINE = "target-only"
JSON_KEYS = ("name", "setting", "tokens_per_s", "ratio_vs_target_only", "tokens_per_pass", "bytes_per_token",
             "floor_ratio", "peak_rss_bytes", "agreement")
HELD_SHARE = 0.01  # reads under 1% of a row's time a token do not bound it: the row has no IO floor


def _head_text(scheme) -> str:
    return f", draft head {scheme}" if scheme else ""


def _threads_text(threads) -> str:
    """torch's threads of the pass (and the draft beside it), and the draft's alone where they differ."""
    if not threads:
        return ""
    alone = draft_alone_differs(threads)
    return f", threads {threads.get('threads')}" + (f" (draft alone {alone})" if alone is not None else "")


def summarize(raw: dict, bandwidth_bps: float | None) -> dict:
    """The metrics of one row from its raw record; ratio and agreement are filled by :func:`compare`."""
    row = {k: raw.get(k) for k in ("name", "setting", "workload", "options", "quantize", "placement", "evictor",
                                   "error", "oom_killed", "memory_limit", "read_limit", "enforced_by",
                                   "kernel_limits", "cgroup_peak_bytes", "stderr_tail", "resumed")}
    row.update(ratio_vs_target_only=None, agreement=None, peak_rss_bytes=raw.get("peak_rss_bytes"),
               cached_after_evict_bytes=(raw.get("evictor") or {}).get("max_cached_after_evict_bytes"))
    generated, seconds, passes = raw.get("generated", 0), raw.get("seconds", 0.0), raw.get("passes", 0)
    bytes_read = raw.get("bytes_read")
    row.update(generated_tokens=generated, target_passes=passes, seconds=seconds, bytes_read=bytes_read,
               bytes_source=raw.get("bytes_source"), draft_steps=raw.get("draft_steps"),
               io_read_bytes=raw.get("io_read_bytes"), time_split_s=raw.get("time_split_s"),
               beside_compute=raw.get("beside_compute"), draft_head=raw.get("draft_head"),
               cpu_threads=raw.get("cpu_threads"))
    row["tokens_per_s"] = generated / seconds if generated and seconds > 0 else None
    row["tokens_per_pass"] = generated / passes if generated and passes else None
    split, tree_tokens = raw.get("time_split_s") or {}, raw.get("tree_tokens")
    row["draft_s_per_token"] = split["draft"] / generated if generated and "draft" in split else None
    row["mean_tree_tokens"] = tree_tokens / passes if tree_tokens and passes else None
    row["provisional"] = {k: raw.get(f"provisional_{k}") for k in ("drafted", "followed", "reused", "dropped")}
    row["provisional"]["reuse"] = reuse_fraction(raw)
    # after the prompt's pass: decode speed without the prefill, which costs every row about the same
    first_s, first_tokens = raw.get("first_pass_s"), raw.get("first_pass_tokens")
    row["first_pass_s"] = first_s
    row["decode_tokens_per_s"] = ((generated - first_tokens) / (seconds - first_s)
                                  if first_s is not None and first_tokens is not None and seconds > first_s
                                  and generated > first_tokens else None)
    row["bytes_per_token"] = bytes_read / generated if generated and bytes_read is not None else None
    return io_floor(row, bandwidth_bps)


def io_floor(row: dict, bandwidth_bps: float | None) -> dict:
    """Set ``floor_s_per_token`` and ``floor_ratio`` of a summarized row; returns the row."""
    # a target held whole in memory (no streamed layer) reads only embedding rows: it has no IO floor
    streams = (row.get("placement") or {}).get("streamed_layers") != 0
    per_token = row.get("bytes_per_token")
    floor = per_token / bandwidth_bps if streams and per_token and bandwidth_bps else None
    achieved = row["seconds"] / row["generated_tokens"] if row.get("generated_tokens") else None
    if floor and achieved and floor < HELD_SHARE * achieved:
        floor = None  # a peer holding its weights (page faults, a few KB a token): reads do not bound it
    row["floor_s_per_token"] = floor
    row["floor_ratio"] = achieved / floor if floor and row["tokens_per_s"] else None
    return row


def agreement(tokens: list, reference: list) -> float | None:
    """Fraction of positions equal, over all prompts; positions past the shorter output count as unequal."""
    equal = total = 0
    for ours, ref in zip(tokens, reference):
        equal += sum(a == b for a, b in zip(ours, ref))
        total += max(len(ours), len(ref))
    return equal / total if total else None


def baseline_name(row: dict, names: set) -> str | None:
    """The target-only row ``row`` is compared with: the one on the same target weights (``llmcad-int4``
    against ``target-only-int4``), else ``target-only``, else the setting's only target-only row."""
    quantize = row.get("quantize")
    if quantize and f"{BASELINE}-{quantize}" in names:
        return f"{BASELINE}-{quantize}"
    if BASELINE in names:
        return BASELINE
    others = sorted(n for n in names if _is_baseline(n))
    return others[0] if len(others) == 1 else None


def _is_baseline(name: str) -> bool:
    """``target-only`` or a quantized copy of it (``target-only-int4``)."""
    return name == BASELINE or name.startswith(f"{BASELINE}-")


def compare(rows: list, tokens: dict, baseline_cut: bool = False) -> list:
    """Fill ``ratio_vs_target_only`` and ``agreement`` against the target-only row of each setting on the
    same target weights (:func:`baseline_name`).

    ``tokens``: (name, setting) -> generated ids per prompt. ``baseline_cut``: target-only generated
    fewer tokens a prompt than the other rows; agreement is then over its positions only.
    """
    base = {(r["setting"], r["name"]): r for r in rows if _is_baseline(r["name"]) and not r.get("error")}
    for row in rows:
        ref_name = baseline_name(row, {name for setting, name in base if setting == row["setting"]})
        if ref_name is None or row.get("error"):
            continue
        ref = base[(row["setting"], ref_name)]
        if row["tokens_per_s"] and ref["tokens_per_s"]:
            row["ratio_vs_target_only"] = row["tokens_per_s"] / ref["tokens_per_s"]
        ours, reference = tokens[(row["name"], row["setting"])], tokens[(ref_name, row["setting"])]
        if baseline_cut:
            ours = [o[:len(r)] for o, r in zip(ours, reference)]
        row["agreement"] = agreement(ours, reference)
        row["baseline"] = ref_name
    return rows


def best_variant(rows: list) -> dict:
    """The fastest of rows that failed nowhere (chain length sweep); the first one when all failed."""
    ok = [r for r in rows if not r.get("error") and r.get("tokens_per_s")]
    return max(ok, key=lambda r: r["tokens_per_s"]) if ok else rows[0]


def machine_info() -> dict:
    """CPU, cores, memory, OS and library versions of this machine."""
    import psutil
    import torch

    from llmcad import _build

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total,
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "torch": torch.__version__}
    # the widest vector ISA torch's CPU kernels use ("AVX2", "AVX512"): bf16 matmuls are several times
    # slower without AVX512 on x86, so tree passes cost more compute there
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    if capability is not None:
        info["cpu_capability"] = capability()
    try:
        import transformers

        info["transformers"] = transformers.__version__
        info["llmcad_build"] = _build.build_info()
    except Exception as exc:  # build info is descriptive only
        info["llmcad_build"] = f"unavailable: {exc}"
    return info


def machine_line(info: dict) -> str:
    isa = f" ({info['cpu_capability']})" if info.get("cpu_capability") else ""
    return (f"{info.get('cpu')}{isa}, {info.get('cores')} cores, {info.get('memory_bytes', 0) / 2**30:.0f} GiB RAM, "
            f"{info.get('os')}, torch {info.get('torch')}, transformers {info.get('transformers')}")


def markdown(report: dict) -> str:
    """The report as markdown: commands and machine, then per setting its workload, table and failures."""
    lines = ["# llmcad end-to-end benchmark", "", "```", *report["commands"], "```", "",
             f"Machine: {machine_line(report['machine'])}"]
    if report.get("git_commit"):
        lines.append(f"Commit measured: {report['git_commit']}")
    if report.get("recomputed"):
        lines.append(f"Derived columns (ratios, agreement, IO floors) recomputed from the measured rows at "
                     f"{report['recomputed']['git_commit']}")
    bw = report.get("bandwidth", {})
    if bw.get("raw_direct_bps"):
        lines.append(f"Raw O_DIRECT bandwidth: {bw['raw_direct_bps'] / 1e9:.2f} GB/s ({bw.get('how')})")
    several = len({r.get("workload") for r in report["rows"]}) > 1  # name the workload only then
    for setting, wl in dict.fromkeys((r["setting"], r.get("workload")) for r in report["rows"]):
        rows = [r for r in report["rows"] if r["setting"] == setting and r.get("workload") == wl]
        lines += ["", f"## {setting}" + (f", {wl}" if several else ""), ""]
        lines += [f"- {key}: {text}" for key, text in _workload_lines(report["workloads"].get(setting, {}))]
        floor = bw.get("floor_bps", {}).get(setting)
        if floor:
            lines.append(f"- IO floor bandwidth: {floor / 1e9:.3f} GB/s")
        lines += ["", _table(rows)]
        failed = [f"- {r['name']}: {r['error']}" for r in rows if r.get("error")]
        if failed:
            lines += ["", "Failed rows:", *failed]
    lines += ["", *_notes(report, several)]
    return "\n".join(lines) + "\n"


def _workload_lines(w: dict):
    if not w:
        return
    yield "prompts", w["prompts"]
    yield "generation", f"greedy, up to {w['max_new_tokens']} new tokens, seed {w['seed']}, warm-up " \
                        f"{w['warmup_tokens']} tokens per row, on a prompt outside the set"
    yield "models", f"draft `{w['draft']}`, target `{w['target']}`, dtype {w['dtype']}, device {w['device']}, " \
                    f"torch threads {w.get('threads')}"
    yield "memory budget", w["memory_budget"]
    if w.get("limits"):
        yield "limits", w["limits"]
    yield "page cache", w["page_cache"]
    if "isolation" in w:
        yield "rows", w["isolation"]


_COLUMNS = (("row", "name", "{}"), ("tok/s", "tokens_per_s", "{:.2f}"),
            ("× target-only", "ratio_vs_target_only", "{:.2f}"),
            ("decode tok/s", "decode_tokens_per_s", "{:.2f}"),
            ("tokens/pass", "tokens_per_pass", "{:.2f}"), ("mean tree", "mean_tree_tokens", "{:.1f}"),
            ("draft s/token", "draft_s_per_token", "{:.3f}"), ("MB read/token", "bytes_per_token", "MB"),
            ("IO floor s/token", "floor_s_per_token", "{:.3f}"), ("achieved/floor", "floor_ratio", "{:.2f}"),
            ("peak RSS", "peak_rss_bytes", "GiB"), ("cgroup peak", "cgroup_peak_bytes", "GiB"),
            ("memory limit", "memory_limit", "GiB"), ("agreement", "agreement", "{:.3f}"))


def _cell(value, fmt: str) -> str:
    if value is None:
        return "—"
    if fmt == "OOM":
        return "OOM-killed"
    if fmt == "MB":
        return f"{value / 1e6:.1f}"
    if fmt == "GiB":
        return f"{value / 2**30:.2f} GiB"
    return fmt.format(value)


def _value(row: dict, key: str, fmt: str) -> tuple:
    """(value, format) of a cell; a row the OOM killer ended says so in its speed column."""
    if key == "tokens_per_s" and row.get("oom_killed"):
        return True, "OOM"
    return row.get(key), fmt


def _table(rows: list) -> str:
    head = "| " + " | ".join(c[0] for c in _COLUMNS) + " |"
    rule = "|" + "|".join("---" if i == 0 else "--:" for i in range(len(_COLUMNS))) + "|"
    body = ["| " + " | ".join(_cell(*_value(r, key, fmt)) for _, key, fmt in _COLUMNS) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def _notes(report: dict, several: bool = False) -> list:
    out = ["Notes:", "- tok/s = generated tokens / generation wall time, summed over prompts (warm-up excluded); "
           "× target-only is against the target-only row of the same setting and target weights (an int4 row "
           "against target-only-int4).",
           "- decode tok/s: the same after the prompt's target pass (tokens it emitted and its time left out).",
           "- MB read/token: llmcad rows count streamed payload bytes; hf rows count /proc/self/io read_bytes "
           "(bytes the process read from storage).",
           "- agreement: fraction of generated positions equal to that target-only row's (positions past the "
           "shorter output count as unequal).",
           "- peak RSS: the row process's own; cgroup peak: the row's cgroup's largest charge (page cache included) "
           "against its memory limit, under a kernel profile."]
    for r in report["rows"]:
        if r.get("placement"):
            out.append(f"- placement of {r['name']} ({r['setting']}): {_short(r['placement'])}")
        cached = r.get("cached_after_evict_bytes")
        if cached and cached > 0.01 * report.get("target_file_bytes", 0):
            out.append(f"- page cache of {r['name']} ({r['setting']}): {cached / 1e9:.2f} GB of the target's files "
                       "stayed cached right after an eviction: pages a process maps (this row's mmap-backed resident "
                       "weights, or another process's) cannot be dropped")
        split = r.get("time_split_s")
        if split:
            out.append(f"- time of {r['name']} ({r['setting']}): draft {split['draft']:.1f} s, target "
                       f"{split['target']:.1f} s, other {split['other']:.1f} s, draft steps {r.get('draft_steps')}"
                       f"{_head_text(r.get('draft_head'))}{_threads_text(r.get('cpu_threads'))}"
                       f"{beside_text(r.get('beside_compute'))}")
    for setting, sweep in report.get("chain_sweep", {}).items():
        out += _sweep_lines(setting, sweep, report, several)
    return out


def _sweep_lines(setting: str, sweep: list, report: dict, several: bool = False) -> list:
    """One line per swept chain row (and workload): each length's tok/s and the prompts the sweep ran."""
    out = []
    for name, wl in dict.fromkeys((s.get("row", "chain"), s.get("workload")) for s in sweep):
        entries = [s for s in sweep if s.get("row", "chain") == name and s.get("workload") == wl]
        shown = ", ".join(f"k={s['chain_length']}: {_cell(s['tokens_per_s'], '{:.2f}')} tok/s" for s in entries)
        prompts = entries[0].get("prompts")
        row = next((r for r in report["rows"] if r["name"] == name and r["setting"] == setting
                    and r.get("workload") == wl), None)
        total = len(row["tokens"]) if row and row.get("tokens") else None
        where = ", ".join(filter(None, (name, setting, wl if several else None)))
        if prompts is not None and total is not None and prompts < total:
            k = (row.get("options") or {}).get("chain_length")
            first = f"first {prompts} prompts" if prompts > 1 else "first prompt"
            out.append(f"- chain k tuned on the {first} ({where}): {shown}; the fastest, "
                       f"k={k}, then ran all {total} prompts as the {name} row")
        else:
            out.append(f"- chain length sweep ({where}): {shown}; the fastest is the {name} row")
    return out


def _short(placement: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in placement.items() if not isinstance(v, list))
