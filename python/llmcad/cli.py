"""The ``llmcad`` command line.

``generate`` lives here. Every other subcommand lives in its own module exposing
``add_arguments(parser) -> None`` and ``run(args) -> int``; it is imported only when invoked, so a
module missing from a build breaks nothing else (that subcommand says so and exits 2).
"""
from __future__ import annotations

import argparse
import json
import sys

from .errors import LLMCadError

# subcommand -> (module, help); "bench" takes one more word naming the benchmark
EXTERNAL = {
    "prepare": ("llmcad.prepare", "import GGUF or another checkpoint into a streamable safetensors directory"),
    "demo": ("llmcad.demo", "run the default real pair on a default prompt"),
    "trace-plot": ("llmcad.trace_plot", "plot a trace written by `generate --trace`"),
}
BENCH = {
    "streamer": "llmcad.bench_streamer",
    "pass": "llmcad.bench_pass",
    "e2e": "llmcad.bench_e2e",
}
MODES = ("llmcad", "tree", "chain", "target-only")
POLICY_FLAGS = ("max_tree_tokens", "max_depth", "branch_threshold", "alpha", "chain_length")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: ``generate`` in full; the other subcommands only for --help (their own
    parsers are built by their modules when invoked, see :func:`main`)."""
    parser = argparse.ArgumentParser(prog="llmcad", description="Run a large LM that does not fit in memory: "
                                     "tree speculative decoding with a layer-streamed target.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_generate_arguments(sub.add_parser("generate", help="generate text from a prompt"))
    for name, (_, help_text) in EXTERNAL.items():
        sub.add_parser(name, help=help_text)
    sub.add_parser("bench", help=f"benchmarks: bench {{{','.join(BENCH)}}} [...] (each with --json)")
    return parser


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft", required=True, help="draft model: local HF directory or hub id")
    p.add_argument("--target", required=True, help="target model: local HF directory or hub id")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--mode", choices=MODES, default="llmcad")
    p.add_argument("--memory-budget", default=None, help="bound on all model memory, e.g. 2GiB (default: "
                   "keep the target resident)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    s = p.add_argument_group("sampling (any of these, or --do-sample, turns sampling on; default greedy)")
    s.add_argument("--do-sample", action="store_true")
    s.add_argument("--temperature", type=float, default=None)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    t = p.add_argument_group("policy (defaults: see llmcad.fallback)")
    t.add_argument("--max-tree-tokens", type=int, default=None, help="tree size limit, root included "
                   "(llmcad, tree)")
    t.add_argument("--max-depth", type=int, default=None, help="draft tokens per branch (llmcad, tree)")
    t.add_argument("--branch-threshold", type=float, default=None, help="draft probability that opens a "
                   "branch (llmcad, tree; default 0.3)")
    t.add_argument("--alpha", type=float, default=None, help="initial fallback threshold (llmcad; 0.01)")
    t.add_argument("--chain-length", type=int, default=None, help="draft tokens per pass (chain)")
    p.add_argument("--json", action="store_true", help='print one JSON object {"text", "tokens", "stats"}')
    p.add_argument("--trace", default=None, metavar="FILE", help="write one JSON line per target pass")


def run_generate(args) -> int:
    from .engine import LLMCad

    _quiet_transformers()
    options = {k: getattr(args, k) for k in POLICY_FLAGS if getattr(args, k) is not None}
    sample = args.do_sample or any(v is not None for v in (args.temperature, args.top_k, args.top_p))
    with LLMCad.from_pretrained(args.draft, args.target, mode=args.mode, memory_budget=args.memory_budget,
                                device=args.device, dtype=args.dtype, **options) as engine:
        result = engine.generate(args.prompt, args.max_new_tokens, do_sample=sample,
                                 temperature=1.0 if args.temperature is None else args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
                                 streamer=None if args.json else _stdout_writer)
    if args.trace:
        with open(args.trace, "w", encoding="utf-8") as f:
            for event in result.trace:
                f.write(json.dumps(event) + "\n")
    if args.json:
        print(json.dumps({"text": result.text, "tokens": result.tokens, "stats": result.stats}))
    else:
        sys.stdout.write("\n")
    return 0


def run_external(module_name: str, command: str, rest: list) -> int:
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        _error(f"'{command}' is not available in this build")
        return 2
    parser = argparse.ArgumentParser(prog=f"llmcad {command}")
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(rest)) or 0)


def dispatch(argv: list) -> int:
    command = argv[0] if argv else None
    if command in EXTERNAL:
        return run_external(EXTERNAL[command][0], command, argv[1:])
    if command == "bench":
        which = argv[1] if len(argv) > 1 else None
        if which not in BENCH:
            _error(f"bench needs one of: {', '.join(BENCH)}")
            return 2
        return run_external(BENCH[which], f"bench {which}", argv[2:])
    return run_generate(build_parser().parse_args(argv))


def main(argv=None) -> int:
    """Entry point of the ``llmcad`` script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return dispatch(argv)
    except KeyboardInterrupt:
        return 130
    except (LLMCadError, ValueError, OSError, ImportError) as exc:
        _error(" ".join(str(exc).split()) or type(exc).__name__)
        return 2


def _stdout_writer(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _error(message: str) -> None:
    print(f"llmcad: error: {message}", file=sys.stderr)


def _quiet_transformers() -> None:
    """No progress bars or deprecation chatter around the generated text."""
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


if __name__ == "__main__":
    sys.exit(main())
