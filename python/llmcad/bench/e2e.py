"""``llmcad bench e2e``: the end-to-end benchmark of llmcad against the peers a user would pick.

Rows, on the same prompts, one fresh child process each (so peak RSS, page cache and memory are the
row's own): ``target-only`` (the streamed target, one token a pass: the baseline), ``chain`` (the
fastest of ``--chain-k``), ``tree`` (fixed-size tree), ``llmcad-paper`` (the paper's alpha rule),
``llmcad`` (best-first growth and the cost rule), ``hf-offload`` (transformers + accelerate disk
offload under the same budget) and ``hf-assisted-offload`` (the same with ``assistant_model=draft``).
``llama.cpp`` and ``llama.cpp-lookup`` (llama-cpp-python on the target's Q4 GGUF, target-only and with
prompt-lookup drafting; run by ``--llama-python``, see :mod:`llmcad.bench.llama_row`), and
``llama.cpp-draft`` (llama.cpp's own speculative decoding with the draft's Q4 GGUF: its
``llama-speculative-simple`` example, ``--llama-speculative``).
Settings (:mod:`llmcad.bench.profiles`): ``--profile orin-nvme,emmc`` (or ``--read-limit``) runs every
row in its own cgroup with a memory limit (the row's budget) and a read throttle; ``--cap RATE`` caps the
streamer itself (llmcad rows only, emulated by llmcad). Workloads (:mod:`llmcad.bench.workloads`):
HumanEval problems and MT-Bench first turns. ``--max-new-tokens-baseline`` lets target-only, whose
cost per token is one pass, generate fewer tokens (its tokens/s is a per-token rate either way).
``--chain-tune-prompts N`` runs the chain lengths on the first N prompts only, then the fastest on all.
``--quantize`` adds ``<row>-int8`` / ``<row>-int4`` copies of the llmcad rows (:mod:`llmcad.bench.quant_rows`).

A row is data: (name, runner, options); for the engine, options are ``LLMCad.from_pretrained``
keyword arguments (``mode`` and policy options); each row runs in :mod:`llmcad.bench.rows`.
Outputs under ``--out`` (default: a fresh ``./llmcad-bench-YYYYmmdd-HHMMSS``): ``rows.jsonl`` (each row's
record as it finishes; a rerun into the same folder resumes from it, :mod:`llmcad.bench.rowlog`),
``e2e.json`` (with the git commit measured), a markdown table with the exact command at the top,
Spec-Bench-style answers per row (:mod:`llmcad.bench.specbench`) and PNG bar charts (drawn last: a
failing chart costs no data).

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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmcad.bench import deps, profiles, quant_rows, workloads
from llmcad.bench.profiles import Setting, as_setting
from llmcad.bench.rowlog import RowLog, row_key
from llmcad.errors import LLMCadError


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
LLAMA_ROWS = (  # run by --llama-python on the target's Q4 GGUF (llmcad.bench.llama_row)
    Row("llama.cpp", "llama", {}, cappable=False),
    Row("llama.cpp-lookup", "llama", {"draft": "prompt-lookup"}, cappable=False),
    # llama.cpp's own speculative decoding with the draft's Q4 GGUF: its llama-speculative-simple example
    Row("llama.cpp-draft", "llama", {"draft": "model"}, cappable=False),
)
DEFAULT_BUDGET = "2.5GiB"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("End-to-end benchmark: llmcad's rows against transformers + accelerate disk offload, under one "
                     "memory budget, on HumanEval prompts (see benchmarks/README.md).")
    p.add_argument("--draft", default=None, help="draft model directory (default: the real pair, fetched)")
    p.add_argument("--target", default=None, help="target model directory (default: the real pair, fetched)")
    p.add_argument("--tiny", action="store_true", help="CI: tiny fixture models (built offline unless --draft/"
                   "--target are given), 2 built-in prompts, budget sized to stream the target")
    workloads.add_arguments(p)
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
    profiles.add_arguments(p)
    p.add_argument("--llama-python", default=None, metavar="PYTHON", help="an interpreter with llama_cpp "
                   "(llama-cpp-python; see benchmarks/README.md): adds the llama.cpp rows")
    p.add_argument("--gguf", default=None, help="the target's GGUF for the llama.cpp rows (default: the demo's "
                   "Q4 file, fetched)")
    p.add_argument("--llama-speculative", default=None, metavar="BINARY", help="llama.cpp's "
                   "llama-speculative-simple (benchmarks/README.md says how to build it): adds the llama.cpp-draft "
                   "row, llama.cpp's own speculative decoding with a draft model")
    p.add_argument("--gguf-draft", default=None, help="the draft's GGUF for the llama.cpp-draft row (default: the "
                   "demo's Q4 draft, fetched)")
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
    p.add_argument("--out", default=None, help="output directory (default: a fresh ./llmcad-bench-YYYYmmdd-HHMMSS); "
                   "a rerun into the same directory resumes: rows finished with the same configuration are kept")
    p.add_argument("--append", action="store_true", help="merge into the JSON already in --out (other "
                   "settings' rows are kept)")
    p.add_argument("--recompute", action="store_true", help="measure nothing: recompute the derived columns "
                   "(ratios, agreement, IO floors) of the finished run in --out with this code, and rewrite its "
                   "report and charts")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the markdown")


def run(args: argparse.Namespace) -> int:
    from llmcad.bench.report import machine_info

    if args.recompute:
        return recompute(args)
    plan = make_plan(args)
    out = Path(plan["out"])
    print(f"llmcad bench e2e: results go to {out}", file=sys.stderr, flush=True)
    report = measure(plan, out)
    report.update(command=plan["command"], commands=[plan["command"]], machine=machine_info(),
                  git_commit=plan["git_commit"])
    if args.append and (out / "e2e.json").is_file():
        report = merge_reports(json.loads((out / "e2e.json").read_text()), report)
    write_report(report, out, as_json=args.json)
    failed = [r["name"] for r in report["rows"] if r.get("error") and not r.get("oom_killed")]
    if failed:
        print(f"llmcad bench e2e: rows failed: {', '.join(failed)} (see the report)", file=sys.stderr)
    return 1 if failed else 0


def recompute(args: argparse.Namespace) -> int:
    """Rewrite the report in ``--out`` with this code's ratios, agreement and IO floors; measures nothing."""
    from llmcad.bench.report import compare, io_floor

    if not args.out or not (Path(args.out) / "e2e.json").is_file():
        raise ValueError("--recompute needs --out DIR holding a finished run's e2e.json")
    out = Path(args.out)
    report = json.loads((out / "e2e.json").read_text())
    if len(report.get("commands", [])) > 1:
        raise ValueError(f"--recompute: {out / 'e2e.json'} merges {len(report['commands'])} commands' rows; "
                         "ratios across runs are not computed")
    measured = recorded_args(report["command"])
    cut = (measured.max_new_tokens_baseline or 0) < (measured.max_new_tokens or 0)
    floor_bps = report.get("bandwidth", {}).get("floor_bps", {})
    for wl in dict.fromkeys(r.get("workload") for r in report["rows"]):
        for setting in dict.fromkeys(r["setting"] for r in report["rows"]):
            rows = [io_floor(r, floor_bps.get(setting)) for r in report["rows"]
                    if r.get("workload") == wl and r["setting"] == setting]
            compare(rows, {(r["name"], setting): r.get("tokens", []) for r in rows}, baseline_cut=cut)
    report["recomputed"] = {"git_commit": git_commit()}
    write_report(report, out, as_json=args.json)
    return 0


def recorded_args(command: str) -> argparse.Namespace:
    """The options of a recorded ``llmcad bench e2e ...`` / ``python -m llmcad.bench.e2e ...`` command."""
    words = shlex.split(command)
    prefixes = (["llmcad", "bench", "e2e"], ["python", "-m", "llmcad.bench.e2e"])
    head = next((len(p) for p in prefixes if words[:len(p)] == p), None)
    parser = argparse.ArgumentParser(prog="llmcad bench e2e", add_help=False)
    add_arguments(parser)
    if head is not None:
        try:
            return parser.parse_args(words[head:])
        except SystemExit:  # argparse's exit on options this version does not read
            pass
    raise ValueError(f"--recompute: the recorded command {command!r} is not an `llmcad bench e2e` command "
                     "line this version reads")


def write_report(report: dict, out: Path, stem: str = "e2e", as_json: bool = False) -> None:
    """JSON and markdown first, then the charts: a chart that fails is a warning and costs no data."""
    from llmcad.bench.report import markdown

    report["plots"] = []
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (out / f"{stem}.md").write_text(text)
    try:
        from llmcad.bench.plots import plot_rows

        report["plots"] = [str(p) for p in plot_rows(report["rows"], out, prefix=stem)]
    except Exception as exc:  # the data is written; a chart is not worth losing it
        print(f"llmcad bench e2e: warning: charts not drawn ({type(exc).__name__}: {' '.join(str(exc).split())}); "
              f"{out / stem}.json and .md are complete", file=sys.stderr)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1) if as_json else text)


# ---------------------------------------------------------------- plan
def default_out() -> Path:
    return Path(f"llmcad-bench-{time.strftime('%Y%m%d-%H%M%S')}")


def make_plan(args) -> dict:
    """Everything the rows need, resolved in the parent: models, workloads, budget, settings, rows. What the
    run will import is checked first, before any model is fetched or row run."""
    out = Path(args.out) if args.out else default_out()
    settings = profiles.make_settings(args)
    max_new = args.max_new_tokens or (12 if args.tiny else 128)
    chain_k = parse_ints(args.chain_k or ("2,4" if args.tiny else "4,6,8"), "--chain-k")
    if args.chain_tune_prompts is not None and args.chain_tune_prompts < 1:
        raise ValueError(f"--chain-tune-prompts {args.chain_tune_prompts}: expected at least 1 prompt")
    rows = select_rows(args, chain_k, quant_rows.parse_schemes(args.quantize))
    llama = any(r.runner == "llama" for r in rows)
    if args.in_process and (llama or any(as_setting(s).kernel for s in settings)):
        raise ValueError("--in-process cannot run llama.cpp rows or kernel profiles (each row needs its own process)")
    deps.check(humaneval=workloads.wants_humaneval(args), hf_rows=any(r.runner == "hf" for r in rows),
               llama_python=args.llama_python if llama else None)
    out.mkdir(parents=True, exist_ok=True)
    draft, target = resolve_pair(args, out)
    loads = workloads.load(args, target)
    budget = args.memory_budget or (tiny_budget(draft, target) if args.tiny else DEFAULT_BUDGET)
    settings = profiles.with_budget(settings, budget, explicit=bool(args.memory_budget and args.memory_limit))
    schemes = quant_rows.schemes_used(rows)
    quantized = quant_rows.prepare_targets(target, schemes, out) if schemes else {}
    return {"command": command_line(), "git_commit": git_commit(), "out": str(out), "draft": str(draft),
            "target": str(target), "target_source": str(target), "workloads": loads,
            "prompt_ids": loads[0]["prompt_ids"], "warmup_ids": loads[0]["warmup_ids"],
            "quantized_targets": quantized, "memory_budget": str(budget),
            "settings": settings, "rows": rows, "max_new_tokens": max_new,
            "chain_tune_prompts": args.chain_tune_prompts, "dtype": args.dtype, "device": args.device,
            "seed": args.seed, "warmup_tokens": min(args.warmup_tokens, max_new),
            "evict_interval_s": args.evict_interval_ms / 1e3, "row_timeout": args.row_timeout,
            "in_process": args.in_process, "copy_target": args.copy_target,
            "threads": args.threads or (1 if args.tiny else None),
            "max_new_tokens_baseline": min(args.max_new_tokens_baseline or max_new, max_new),
            "llama_python": args.llama_python, "gguf": (resolve_gguf(args) if llama else None),
            "llama_speculative": args.llama_speculative, "gguf_draft": resolve_gguf_draft(args, rows),
            "eos_ids": end_ids(target) if llama else None}


def resolve_pair(args, out: Path) -> tuple:
    if (args.draft is None) != (args.target is None):
        raise ValueError("give both --draft and --target, or neither")
    if args.draft is not None:
        from llmcad.models.catalog import resolve

        return Path(resolve(args.draft)), Path(resolve(args.target))
    if args.tiny:
        from llmcad.bench.tiny_pair import build_tiny_pair

        return build_tiny_pair(out / "tiny-models")
    from llmcad.models.fetch import ensure_real_pair

    return ensure_real_pair("bfloat16")


def resolve_gguf(args) -> str:
    """The llama.cpp rows' GGUF: ``--gguf``, or the demo's Q4 target (fetched as ``llmcad demo`` does)."""
    if args.gguf:
        if not Path(args.gguf).is_file():
            raise ValueError(f"--gguf {args.gguf}: no such file")
        return str(Path(args.gguf).resolve())
    if args.tiny:
        raise ValueError("the llama.cpp rows on --tiny models need --gguf FILE")
    from llmcad.models.fetch import TARGET, ensure_gguf

    return str(ensure_gguf(TARGET))


def resolve_gguf_draft(args, rows) -> str | None:
    """The llama.cpp-draft row's draft GGUF: ``--gguf-draft``, or the demo's Q4 draft; None without that row."""
    if not any(r.options.get("draft") == "model" for r in rows):
        return None
    if args.gguf_draft:
        if not Path(args.gguf_draft).is_file():
            raise ValueError(f"--gguf-draft {args.gguf_draft}: no such file")
        return str(Path(args.gguf_draft).resolve())
    if args.tiny:
        raise ValueError("the llama.cpp-draft row on --tiny models needs --gguf-draft FILE")
    from llmcad.models.fetch import DRAFT, ensure_gguf

    return str(ensure_gguf(DRAFT))


def end_ids(target) -> list:
    """The target's end-of-generation ids (generation_config.json), where a llama.cpp row stops."""
    from transformers import GenerationConfig

    eos = GenerationConfig.from_pretrained(target).eos_token_id
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def tiny_budget(draft, target) -> int:
    """A budget that holds this process's runtime floor (with its slack), the draft, the target's
    non-layer tensors, a few layers, both KV caches and the least pass (as the streamed target budgets
    them): the target streams."""
    from transformers import AutoConfig

    from llmcad import memory
    from llmcad.streaming.budget import PASS_ROWS, RUNTIME_SLACK, kv_cache_bytes, pass_work_bytes
    from llmcad.streaming.weights import checkpoint_files, load_index

    index = load_index(target)
    dtype = index.layers[0][0].torch_dtype
    draft_bytes = sum(f.stat().st_size for f in checkpoint_files(draft))
    largest = max(index.layer_bytes(i) for i in range(index.num_layers))
    configs = [AutoConfig.from_pretrained(path, trust_remote_code=False) for path in (target, draft)]
    tokens = min(2048, configs[0].max_position_embeddings)
    kv = sum(kv_cache_bytes(config, tokens, dtype) for config in configs)
    work = pass_work_bytes(configs[0], configs[1], PASS_ROWS[-1], tokens, dtype, dtype)
    return (memory.runtime_floor() + RUNTIME_SLACK + draft_bytes + index.non_layer_bytes() + int(4.5 * largest)
            + kv + work + (64 << 10))


def select_rows(args, chain_k: list, schemes: list = ()) -> list:
    """The rows to run, chain expanded into one variant per length, with ``--row-option`` applied.

    Quantized rows: ``--rows`` naming any ``<row>-<scheme>`` runs exactly the rows named; naming none
    (or no ``--rows``) adds a copy of every chosen llmcad row per ``--quantize`` scheme.
    """
    engine_names = {r.name for r in MAIN_ROWS if r.runner == "engine"}
    rows = list(MAIN_ROWS) + quant_rows.quantized_rows(MAIN_ROWS, schemes) + list(LLAMA_ROWS)
    if args.rows:
        wanted = [n.strip() for n in args.rows.split(",") if n.strip()]
        quant_rows.check_names(wanted, engine_names, schemes)
        unknown = sorted(set(wanted) - {r.name for r in rows})
        if unknown:
            raise ValueError(f"--rows: unknown row(s) {', '.join(unknown)}; rows: "
                             f"{', '.join(r.name for r in MAIN_ROWS + LLAMA_ROWS)}, and <llmcad row>-int8 / -int4 "
                             "with --quantize")
        names_quantized = any(quant_rows.split_name(n, engine_names) for n in wanted)
        rows = [r for r in rows if r.name in wanted or not names_quantized and base_name(r) in wanted]
        llama = [r.name for r in rows if r.runner == "llama"]
        if llama and not getattr(args, "llama_python", None):
            raise ValueError(f"--rows: {', '.join(llama)} need --llama-python PYTHON (an interpreter with "
                             "llama-cpp-python; see benchmarks/README.md)")
        drafted = [r.name for r in rows if r.options.get("draft") == "model"]
        if drafted and not getattr(args, "llama_speculative", None):
            raise ValueError(f"--rows: {', '.join(drafted)} needs --llama-speculative BINARY (llama.cpp's "
                             "llama-speculative-simple; see benchmarks/README.md)")
    else:
        if not getattr(args, "llama_python", None):
            rows = [r for r in rows if r.runner != "llama"]
        if not getattr(args, "llama_speculative", None):
            rows = [r for r in rows if r.options.get("draft") != "model"]
    binary = getattr(args, "llama_speculative", None)
    if any(r.options.get("draft") == "model" for r in rows) and not (Path(binary).is_file()
                                                                    and os.access(binary, os.X_OK)):
        raise ValueError(f"--llama-speculative {binary}: not an executable file")
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


def parse_ints(text: str, flag: str) -> list:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"{flag} {text!r}: expected positive integers separated by commas")
    return values


def git_commit(tree=None) -> str | None:
    """The commit of the source tree measured (``tree``: another checkout; None outside a git checkout)."""
    where = Path(tree) if tree is not None else Path(__file__).resolve().parent
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10)
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
    """Run every (workload, row, setting) in a child, each record appended to ``out/rows.jsonl`` as it
    finishes (and taken from there when an earlier run finished it); returns the report's rows."""
    from llmcad.streaming.weights import checkpoint_files

    log = RowLog(out)
    results = {}
    with tempfile.TemporaryDirectory(prefix="llmcad-e2e-", dir=out) as work:
        target = private_copy(plan["target"], Path(work) / "target") if plan["copy_target"] else plan["target"]
        target_files = checkpoint_files(target)
        raw_before = raw_bandwidth(target_files)
        for wl in plan["workloads"]:
            folder = Path(work) / wl["name"]
            folder.mkdir()
            results[wl["name"]] = run_jobs(workload_plan(dict(plan, target=str(target)), wl), folder, log)
            write_specbench(plan, wl, results[wl["name"]], out)
        raw_after = raw_bandwidth(target_files)
    raw_bps = max((b for b in (raw_before, raw_after) if b), default=None)
    settings = [as_setting(s) for s in plan["settings"]]
    floor_bps = {s.name: min(b for b in (raw_bps, s.cap, s.read_limit) if b) for s in settings} if raw_bps else {}
    rows, sweep = [], {}
    for wl in plan["workloads"]:
        collected, swept = collect_rows(workload_plan(plan, wl), results[wl["name"]], floor_bps)
        rows += [dict(r, workload=wl["name"]) for r in collected]
        for setting, entries in swept.items():
            sweep.setdefault(setting, []).extend(dict(e, workload=wl["name"]) for e in entries)
    return {"workloads": {s.name: workload(plan, s) for s in settings},
            "settings": {s.name: dict(s._asdict(), description=s.describe()) for s in settings},
            "bandwidth": {"raw_direct_bps": raw_bps, "raw_direct_bps_before": raw_before,
                          "raw_direct_bps_after": raw_after, "floor_bps": floor_bps,
                          "caps": {s.name: s.cap for s in settings if s.cap},
                          "read_limits": {s.name: s.read_limit for s in settings if s.read_limit},
                          "how": "O_DIRECT sequential read of the target's safetensors files, cold, before and "
                                 "after the rows; the faster is used (a setting's floor: the lowest of it, the "
                                 "cap and the read limit)"},
            "rows": rows, "chain_sweep": sweep, "prompt_labels": {wl["name"]: wl["labels"] for wl in plan["workloads"]},
            "target_file_bytes": sum(Path(f).stat().st_size for f in checkpoint_files(plan["target"]))}


def workload_plan(plan: dict, wl: dict) -> dict:
    return dict(plan, workload=wl["name"], prompt_ids=wl["prompt_ids"], warmup_ids=wl["warmup_ids"])


def write_specbench(plan: dict, wl: dict, records: list, out: Path) -> None:
    """Spec-Bench-style answers of every finished row (a chain length's file is named ``chain-k4``)."""
    from llmcad.bench import specbench
    from llmcad.models.loading import load_tokenizer

    tokenizer = load_tokenizer(plan["target_source"])
    for record in records:
        if record.get("tuning"):
            continue
        k = (record.get("options") or {}).get("chain_length")
        named = dict(record, name=f"{record['name']}-k{k}") if k else record
        specbench.write(out, named, wl, lambda ids: tokenizer.decode(ids, skip_special_tokens=True))


def row_groups(plan: dict) -> list:
    """(setting, the row's variants) per row and setting, in run order; a setting the streamer caps itself
    (emulated) skips the rows it cannot cap."""
    names = dict.fromkeys(r.name for r in plan["rows"])
    groups = [(as_setting(setting), [r for r in plan["rows"] if r.name == name])
              for setting in plan["settings"] for name in names]
    return [(setting, group) for setting, group in groups if not setting.cap or group[0].cappable]


def tune_prompts(plan: dict) -> int | None:
    """Prompts a chain sweep runs when fewer than all (then the fastest length runs all prompts again)."""
    n = plan.get("chain_tune_prompts")
    return n if n is not None and n < len(plan["prompt_ids"]) else None


def row_config(plan: dict, row: Row, setting: Setting) -> dict:
    """Everything a row's result depends on: the key of its line in rows.jsonl."""
    keys = ("draft", "target_source", "memory_budget", "dtype", "device", "seed", "warmup_tokens", "threads",
            "evict_interval_s", "copy_target", "in_process", "workload", "prompt_ids", "warmup_ids")
    return {**{k: plan.get(k) for k in keys}, "row": asdict(row), "setting": list(setting),
            "max_new_tokens": max_new_tokens(plan, row), "gguf": plan.get("gguf") if row.runner == "llama" else None,
            **({"gguf_draft": plan.get("gguf_draft")} if row.options.get("draft") == "model" else {})}


def max_new_tokens(plan: dict, row: Row) -> int:
    return plan["max_new_tokens_baseline"] if row.options.get("mode") == "target-only" else plan["max_new_tokens"]


def run_jobs(plan: dict, work: Path, log: RowLog | None = None) -> list:
    """Raw records of every (row, setting). A chain sweep on the first ``tune_prompts`` prompts adds its
    records marked ``tuning`` (the number of prompts), then the fastest length's record on all prompts.
    Each record goes to ``log`` as it finishes; a row ``log`` holds finished is not run again."""
    tune, groups = tune_prompts(plan), row_groups(plan)
    total = sum(len(group) + (tune is not None and len(group) > 1) for _, group in groups)
    results: list = []

    def run(row: Row, setting: Setting, job_plan: dict, note: str = "", tuning: int | None = None) -> dict:
        index = len(results)
        key = row_key(dict(row_config(job_plan, row, setting), tuning=tuning))
        done = log.finished(key) if log is not None else None
        where = ", ".join(filter(None, (setting.name, plan.get("workload"))))
        print(f"[{index + 1}/{total}] {row.name} {_variant(row)}({where}){note}" +
              (": finished in an earlier run, kept" if done else ""), file=sys.stderr, flush=True)
        record = dict(done, resumed=True) if done else spawn_row(job_plan, row, setting, work, index)
        if tuning:
            record["tuning"] = tuning
        if log is not None and not done:
            log.append(key, dict(record, git_commit=plan.get("git_commit"), command=plan.get("command")))
        results.append(record)
        return record

    for setting, group in groups:
        if tune is None or len(group) == 1:
            for row in group:
                run(row, setting, plan)
            continue
        subset = dict(plan, prompt_ids=plan["prompt_ids"][:tune])
        tuning = [run(row, setting, subset, f" tuning on the first {tune} prompts", tune) for row in group]
        best = fastest(tuning)
        if best is None:
            results.append({"name": group[0].name, "setting": setting.name, "options": group[0].options,
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
    for setting in (as_setting(s).name for s in plan["settings"]):
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


def workload(plan: dict, setting: Setting) -> dict:
    """How the rows of ``setting`` ran: prompts, models, budget, limits, page cache and isolation."""
    from llmcad.bench.pagecache import METHOD

    timer = f" and every {plan['evict_interval_s'] * 1e3:g} ms from a thread" if plan["evict_interval_s"] > 0 else ""
    page_cache = (f"{METHOD}{timer}, on the target's files and the peers' offload folder; also before each "
                  "prompt, with the streamer's prefetched layers dropped (llmcad reads with O_DIRECT)")
    if setting.kernel:
        page_cache = ("the model files evicted once before each row; no thread touches the page cache while a row "
                      "runs: the cgroup charges it to the row's memory limit")
    return {"prompts": "; ".join(wl["flag"] for wl in plan["workloads"]),
            "max_new_tokens": plan["max_new_tokens"], "seed": plan["seed"], "draft": plan["draft"],
            "target": plan["target"] + (" (read from a private copy, so no other process maps its pages)"
                                        if plan["copy_target"] else ""),
            "dtype": plan["dtype"] or "checkpoint's", "device": plan["device"],
            "threads": plan["threads"] or "torch default",
            "memory_budget": profiles.budget_of(setting, plan["memory_budget"]),
            "limits": setting.describe(), "warmup_tokens": plan["warmup_tokens"],
            "isolation": ("all rows in one process (peak RSS is the run's so far)" if plan["in_process"] else
                          "one fresh process per row (peak RSS is the row's, loading included)" +
                          (", in a fresh cgroup" if setting.kernel else "")),
            "page_cache": page_cache}


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


def spawn_row(plan: dict, row: Row, setting, work: Path, index: int) -> dict:
    """Run one row in a fresh process (under a kernel profile, in a fresh cgroup; or here, with
    ``in_process``); returns its raw record, with ``error`` set when it failed."""
    from llmcad.bench.launch import launch

    setting = as_setting(setting)
    job = {key: plan[key] for key in ("draft", "target", "prompt_ids", "warmup_ids", "dtype", "device", "seed",
                                      "warmup_tokens", "evict_interval_s", "threads", "quantized_targets")}
    job.update(row=asdict(row), setting=setting.name, cap=setting.cap, max_new_tokens=max_new_tokens(plan, row),
               memory_budget=profiles.budget_of(setting, plan["memory_budget"]),
               page_cache="kernel" if setting.kernel else "evict", offload_folder=str(work / f"offload-{index}"))
    if row.runner == "llama":
        job.update(gguf=plan["gguf"], eos_ids=plan["eos_ids"], gguf_draft=plan.get("gguf_draft"),
                   llama_speculative=plan.get("llama_speculative"))
    if plan["in_process"]:
        from llmcad.bench.rows import row_record

        return row_record(job)
    target = plan["quantized_targets"][row.options["quantize"]] if row.options.get("quantize") else plan["target"]
    files = ([plan["gguf"]] + ([plan["gguf_draft"]] if row.options.get("draft") == "model" else [])
             if row.runner == "llama" else [target, plan["draft"]])  # evicted; the first's disk throttled
    return launch(job, setting, work, index, timeout=plan["row_timeout"], llama_python=plan.get("llama_python"),
                  files=files)


def merge_reports(old: dict, new: dict) -> dict:
    """``new``'s rows replace ``old``'s rows of the same (name, setting, workload); commands accumulate."""
    keys = {(r["name"], r["setting"], r.get("workload")) for r in new["rows"]}
    merged = dict(new)
    merged["rows"] = [r for r in old.get("rows", []) if (r["name"], r["setting"], r.get("workload")) not in keys] + \
        new["rows"]
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
