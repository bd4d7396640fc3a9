"""``llmcad bench chat``: a scripted multi-turn conversation, each turn answered with and without the prompt
prefix cache, in one run on one engine.

The script (default: llmcad/bench/data/chat_script.json, shipped with the package) is ``{"system": str, "turns": [str,
...]}``: each turn is a user message; the conversation so far (the replies included) goes through the
target's chat template. Per turn: prompt tokens, tokens reused from the cache, time to first token
(from the generate call to the first generated token reaching the streamer) and tokens/s, without and
with reuse, and their ratios (with / without). The turn runs without reuse first (the engine's cache put
aside), then with it; greedy replies must be equal (``lossless``), and the reply without reuse is the
one the conversation keeps. A first short generation warms the engine up and is not reported.

Part of llmcad.bench (tools): may import the whole package; nothing outside llmcad.bench imports it.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from llmcad.errors import PromptError

DEFAULT_SCRIPT = Path(__file__).resolve().parent / "data" / "chat_script.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llmcad.cli import add_model_arguments

    p.description = ("A scripted multi-turn conversation: each turn's time to first token and tokens/s with and "
                     "without reusing the conversation's KV (the prompt prefix cache), in one run.")
    add_model_arguments(p)
    p.add_argument("--script", default=None, help="conversation JSON {\"system\": ..., \"turns\": [...]} "
                   f"(default: {DEFAULT_SCRIPT.name} in the repository's benchmarks/)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens per reply (default 48)")
    p.add_argument("--compare-turns", default=None, metavar="N,M,...", help="run only these turns without reuse too "
                   "(default: every turn); the others run once, with reuse, to build the conversation")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def run(args: argparse.Namespace) -> int:
    from llmcad.cli import check_model_arguments, open_engine, quiet_transformers

    script = load_script(args.script)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: expected an int >= 1")
    compare = parse_turns(args.compare_turns, len(script["turns"]))
    check_model_arguments(args)
    quiet_transformers()
    with open_engine(args) as engine:
        turns = converse(engine, script, args.max_new_tokens, compare)
    report = {"command": "llmcad " + " ".join(shlex.quote(a) for a in sys.argv[1:]), "mode": args.mode,
              "memory_budget": args.memory_budget, "max_new_tokens": args.max_new_tokens, "turns": turns}
    print(json.dumps(report, indent=1) if args.json else table(report))
    return 0


def load_script(path) -> dict:
    """The conversation script, checked: a system message (may be empty) and at least one user turn."""
    path = Path(path) if path is not None else DEFAULT_SCRIPT
    if not path.is_file():
        raise PromptError(f"--script {path}: no such file")
    try:
        script = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PromptError(f"--script {path}: not JSON ({exc})") from None
    turns = script.get("turns") if isinstance(script, dict) else None
    if not (isinstance(turns, list) and turns and all(isinstance(t, str) and t for t in turns)
            and isinstance(script.get("system", ""), str)):
        raise PromptError(f"--script {path}: expected {{\"system\": str, \"turns\": [non-empty str, ...]}}")
    return {"system": script.get("system", ""), "turns": turns}


def parse_turns(text, count: int) -> set:
    """Turn numbers (1-based) from ``N,M,...``; every turn when None."""
    if text is None:
        return set(range(1, count + 1))
    try:
        turns = {int(t) for t in text.split(",")}
    except ValueError:
        raise ValueError(f"--compare-turns {text!r}: expected turn numbers such as 1,4") from None
    if not turns or not all(1 <= t <= count for t in turns):
        raise ValueError(f"--compare-turns {text!r}: the script has turns 1..{count}")
    return turns


def converse(engine, script: dict, max_new_tokens: int, compare=None) -> list:
    """One row per turn (see the module docstring); turns outside ``compare`` (a set of turn numbers,
    None: all) run with reuse only, and their ``without_reuse`` and ratios are None."""
    from llmcad.models.chat import chat_prompt_ids
    from llmcad.speculative.prefix_cache import common_prefix

    cache = engine.prefix_cache
    if cache is None:
        raise ValueError("the engine was built with prefix_cache=False: nothing to compare")
    messages = [{"role": "system", "content": script["system"]}] if script["system"] else []
    engine.prefix_cache = None
    engine.generate(messages + [{"role": "user", "content": "Hi"}], 2)  # warm-up, not reported
    engine.prefix_cache = cache
    rows = []
    for i, turn in enumerate(script["turns"], 1):
        messages.append({"role": "user", "content": turn})
        without, reply = None, None
        if compare is None or i in compare:
            engine.prefix_cache = None
            without, reply = timed_generate(engine, messages, max_new_tokens)
            engine.prefix_cache = cache
        with_reuse, reply_reused = timed_generate(engine, messages, max_new_tokens)
        reply = reply_reused if reply is None else reply
        prompt = chat_prompt_ids(engine.tokenizer, messages)
        # the conversation before this turn's user message: what the earlier rendering shares with this one
        history = common_prefix(prompt, chat_prompt_ids(engine.tokenizer, messages[:-1])) if len(messages) > 1 else 0
        messages.append({"role": "assistant", "content": reply})
        rows.append({"turn": i, "prompt_tokens": len(prompt), "history_tokens": history,
                     "without_reuse": without, "with_reuse": with_reuse,
                     "lossless": None if without is None else reply == reply_reused,
                     "ttft_ratio": _ratio(with_reuse, without, "ttft_s"),
                     "tokens_per_s_ratio": _ratio(with_reuse, without, "tokens_per_s")})
        print(f"llmcad bench chat: turn {i}: {len(prompt)} prompt tokens, {with_reuse['cached_tokens']} reused; time "
              f"to first token {_seconds(without)} without reuse, {_seconds(with_reuse)} with "
              f"({_fmt(rows[-1]['ttft_ratio'])})", file=sys.stderr, flush=True)
    return rows


def timed_generate(engine, messages, max_new_tokens: int) -> tuple[dict, str]:
    """({ttft_s, total_s, generated_tokens, tokens_per_s, cached_tokens}, reply text) of one greedy turn."""
    first = []
    streamer = _FirstToken(first)
    t0 = time.perf_counter()
    result = engine.generate(messages, max_new_tokens, streamer=streamer)
    total = time.perf_counter() - t0
    ttft = (first[0] - t0) if first else total
    n = len(result.tokens)
    return {"ttft_s": ttft, "total_s": total, "generated_tokens": n, "tokens_per_s": n / total if total > 0 else 0.0,
            "cached_tokens": result.stats.get("cached_tokens", 0)}, result.text


class _FirstToken:
    """A put()/end() streamer that notes when the first generated tokens arrive (the prompt comes first)."""

    def __init__(self, times: list):
        self.times, self.calls = times, 0

    def put(self, _token_ids) -> None:
        self.calls += 1
        if self.calls == 2:
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _ratio(with_reuse: dict, without: dict | None, key: str):
    return with_reuse[key] / without[key] if without is not None and without[key] else None


def _seconds(row: dict | None, key: str = "ttft_s") -> str:
    return "-" if row is None else f"{row[key]:.2f} s"


def _rate(row: dict | None) -> str:
    return "-" if row is None else f"{row['tokens_per_s']:.2f}"


def table(report: dict) -> str:
    """The report as a markdown table, the command first."""
    lines = [f"`{report['command']}`", "",
             "| turn | history tokens | prompt tokens | reused | TTFT without | TTFT with | TTFT ratio | "
             "tok/s without | tok/s with | tok/s ratio | lossless |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in report["turns"]:
        a, b = r["without_reuse"], r["with_reuse"]
        lossless = {True: "yes", False: "NO", None: "-"}[r["lossless"]]
        lines.append(f"| {r['turn']} | {r['history_tokens']} | {r['prompt_tokens']} | {b['cached_tokens']} | "
                     f"{_seconds(a)} | {_seconds(b)} | {_fmt(r['ttft_ratio'])} | {_rate(a)} | {_rate(b)} | "
                     f"{_fmt(r['tokens_per_s_ratio'])} | {lossless} |")
    return "\n".join(lines)


def _fmt(ratio) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"
