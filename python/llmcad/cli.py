"""The ``llmcad`` command line.

``generate`` lives here. Every other subcommand lives in its own module exposing
``add_arguments(parser) -> None`` and ``run(args) -> int``; it is imported only when invoked, so a
module missing from a build breaks nothing else (that subcommand says so and exits 2).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings

from llmcad.errors import LLMCadError

# subcommand -> (module, help); "bench" takes one more word naming the benchmark
EXTERNAL = {
    "prepare": ("llmcad.models.prepare", "import GGUF or another checkpoint into a streamable safetensors directory"),
    "demo": ("llmcad.demo", "run the default real pair on a default prompt"),
    "models": ("llmcad.models.catalog", "list the prepared models in the cache (llmcad models rm NAME removes one)"),
    "chat": ("llmcad.chat", "talk with a chat model: keeps the conversation, streams each reply"),
    "trace-plot": ("llmcad.bench.trace_plot", "plot a trace written by `generate --trace`"),
    "serve": ("llmcad.serve.command", "an OpenAI-compatible HTTP server (needs pip install \"llmcad[serve]\")"),
}
BENCH = {
    "streamer": "llmcad.bench.streamer_bench",
    "pass": "llmcad.bench.pass_bench",
    "e2e": "llmcad.bench.e2e",
    "chat": "llmcad.bench.chat_bench",
    "draft": "llmcad.bench.draft_bench",
}
BENCH_HELP = {
    "streamer": "cold-read throughput of the weight streamer against a raw O_DIRECT read",
    "pass": "one cold streamed target pass over a token tree, against IO and compute alone",
    "e2e": "llmcad against the peers a user would pick, on the real pair (or --tiny)",
    "chat": "a scripted conversation: each turn's time to first token with and without the prompt cache",
    "draft": "a draft's forward time by rows and agreement with the target, packed and pruned variants",
}
MODES = ("llmcad", "tree", "chain", "target-only")
POLICY_FLAGS = ("max_tree_tokens", "max_depth", "branch_threshold", "alpha", "alpha_rule", "prompt_lookup",
                "chain_length")


class UsageError(ValueError):
    """A command line argparse refused; reported like every other error (one line, exit status 2)."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors raise UsageError (one line, no usage block) instead of exiting."""

    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with every default: argparse's "(default: X)" where the default is a value; an option
    whose default is None (it depends on the mode, the model...) says it in its own help text, and a
    flag's default is off."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: ``generate`` in full; the other subcommands only for --help (their own
    parsers are built by their modules when invoked, see :func:`main`)."""
    parser = Parser(prog="llmcad", description="Run a large LM that does not fit in memory: "
                                     "tree speculative decoding with a layer-streamed target.")
    parser.add_argument("--version", action="version", version=version_text())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_generate_arguments(sub.add_parser("generate", help="generate text from a prompt",
                                          formatter_class=DefaultsFormatter))
    for name, (_, help_text) in EXTERNAL.items():
        sub.add_parser(name, help=help_text)
    sub.add_parser("bench", help=f"benchmarks: bench {{{','.join(BENCH)}}} [...] (each with --json)")
    return parser


def version_text() -> str:
    """``llmcad X.Y.Z`` and what the extension was compiled with."""
    from llmcad import __version__

    try:
        from llmcad import build_info

        info = build_info()
    except ImportError:
        return f"llmcad {__version__} (compiled extension missing)"
    return (f"llmcad {__version__} (CUDA {'compiled' if info['cuda_compiled'] else 'not compiled'}, "
            f"io_uring {'compiled' if info['io_uring_compiled'] else 'not compiled'})")


DEFAULT_BUDGET = "auto"  # every command's: the memory cgroup's limit, else what is free, less a margin


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The draft/target pair, where and how the target runs, and the verification policy."""
    p.add_argument("--draft", default=None, help="draft model: a directory, a name `llmcad models` lists, or a hub "
                   "id (default: the demo pair, fetched once as `llmcad demo` does)")
    p.add_argument("--target", default=None, help="target model: a directory, a name `llmcad models` lists, or a "
                   "hub id (default: the demo pair's)")
    p.add_argument("--mode", choices=MODES, default="llmcad", help="verification policy (see docs/python-api.md)")
    p.add_argument("--memory-budget", default=DEFAULT_BUDGET, help="bound on the peak resident memory of the whole "
                   "process (runtime, both models, caches, passes), e.g. 2.5GiB; 'auto': the memory cgroup's limit, "
                   "else MemAvailable, less a margin; 'none': keep the target resident, unbounded")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--trust-remote-code", action="store_true", help="run Python code a model directory ships "
                   "(auto_map in its config); without it such a model is refused. Read that code first")
    p.add_argument("--threads", default="auto", metavar="N|auto", help="torch's compute threads "
                   "(default: auto: torch's, one per physical core, less the cores other processes keep busy "
                   "while the models load; OMP_NUM_THREADS, where set, fixes it)")
    p.add_argument("--draft-threads", default="auto", metavar="N|auto", help="the draft's compute threads when it "
                   "drafts alone, no target pass in flight (default: auto: every core other processes leave free, "
                   "at least --threads)")
    t = p.add_argument_group("policy (each for the modes named)")
    t.add_argument("--max-tree-tokens", type=int, default=None, help="tree size limit, root included "
                   "(llmcad, tree; default: llmcad sizes it to the device, tree 32, llmcad --alpha-rule paper 32)")
    t.add_argument("--max-depth", type=int, default=None, help="draft tokens per branch (llmcad, tree; default: "
                   "llmcad the tree size less one, tree 10, llmcad --alpha-rule paper 10)")
    t.add_argument("--branch-threshold", type=float, default=None, help="draft probability that opens a "
                   "branch (llmcad, tree; default: tree 0.3, llmcad --alpha-rule paper 0.3, llmcad none: a node's "
                   "children are its top tokens worth drafting)")
    t.add_argument("--alpha-rule", choices=("cost", "paper"), default=None, help="llmcad: verify by the "
                   "measured cost model (cost) or by the paper's alpha equation (paper) (default: cost)")
    t.add_argument("--alpha", type=float, default=None, help="initial fallback threshold (llmcad with "
                   "--alpha-rule paper; default: 0.01)")
    t.add_argument("--prompt-lookup", action=argparse.BooleanOptionalAction, default=None, help="llmcad "
                   "(cost rule): copies of the prompt and the text so far join the tree as free branches "
                   "(default: on)")
    t.add_argument("--chain-length", type=int, default=None, help="draft tokens per pass (chain; default: 5)")
    t.add_argument("--draft-vocab", default=None, metavar="N", help="the draft proposes only the N most frequent "
                   "tokens of a calibration corpus (a cheaper draft forward, the same output; every drafting "
                   "mode); 0 or 'none': the full vocabulary (default: none)")
    t.add_argument("--draft-head", default="auto", choices=("auto", "float", "int8", "int4"), help="how the "
                   "draft's output layer is held: packed int8 or int4 (a cheaper draft forward, the same output) or "
                   "float; auto: packed like the draft's decoder linears on a CPU (default: auto)")
    e = p.add_argument_group("pipeline (llmcad mode; for ablations)")
    e.add_argument("--no-pipeline", dest="pipeline", action="store_const", const=False, default=None,
                   help="verify on the main thread, no provisional drafting (default: on in llmcad mode)")
    e.add_argument("--pipeline", dest="pipeline", action="store_const", const=True,
                   help="pipeline a chain or tree mode too")
    e.add_argument("--no-prefetch", dest="prefetch", action="store_false",
                   help="do not read the next pass's layers while the draft drafts")
    e.add_argument("--no-draft-beside-compute", dest="draft_beside_compute", action="store_false",
                   help="the draft steps only while the target waits on reads (default: also while it computes, "
                   "where the measured slowdowns say that pays)")
    e.add_argument("--no-prefill-beside", dest="prefill_beside", action="store_const", const=False, default=None,
                   help="a resident target caches the prompt in the first pass, after the draft's first tree "
                   "(default: on a thread of its own beside the draft, where torch's threads leave a core free)")
    e.add_argument("--max-provisional-tokens", type=int, default=None,
                   help="provisional tokens per verification (default: bounded by the IO waits; 8 on the main "
                   "path of a chain or tree mode)")
    e.add_argument("--bandwidth-cap", default=None, metavar="RATE",
                   help="cap the streamer's read bandwidth (emulate slower storage): 300MB/s, 1.4GB/s, 300MiB/s "
                   "or bytes/s, at least 1000 (default: uncapped)")


def add_prompt_cache_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-prompt-cache", dest="prompt_cache", action="store_false",
                   help="prefill every prompt from scratch instead of reusing the KV of the longest prefix it "
                   "shares with an earlier prompt and its answer (a conversation's earlier turns, a shared "
                   "system prompt)")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    s = p.add_argument_group("sampling (any of these, or --do-sample, turns sampling on; default greedy)")
    s.add_argument("--do-sample", action="store_true", help="sample from the target's distribution")
    s.add_argument("--temperature", type=float, default=None, help="0 is greedy (default: 1.0 when sampling)")
    s.add_argument("--top-k", type=int, default=None, help="keep the K likeliest tokens (default: all)")
    s.add_argument("--top-p", type=float, default=None, help="keep the likeliest tokens whose probabilities sum "
                   "to P (default: 1.0, all)")
    s.add_argument("--seed", type=int, default=None, help="sampling seed, for reproducible samples (default: a "
                   "random one)")
    p.add_argument("--stop", action="append", default=None, type=unescape, help="stop string (repeatable; "
                   r"\n, \t, \r and \\ are unescaped; default: none)")


def unescape(text: str) -> str:
    r"""``--stop``'s value with \n, \t, \r and \\ turned into the characters (as a shell user types
    them); any other backslash stays as it is."""
    return re.sub(r"\\([nrt\\])", lambda m: _ESCAPES[m[1]], text)


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text; - reads it from stdin")
    source.add_argument("--file", metavar="PATH", help="read the prompt from a UTF-8 text file")
    p.add_argument("--raw", action="store_true", help="send the prompt as raw text (default: as a user message "
                   "through the target's chat template when its tokenizer has one)")
    p.add_argument("--system", default=None, help="a system message before the prompt (chat template only; "
                   "default: none)")
    add_sampling_arguments(p)
    p.add_argument("--json", action="store_true", help='print one JSON object {"text", "tokens", "stats"}')
    p.add_argument("--quiet", action="store_true", help="no timing summary on stderr after the text")
    p.add_argument("--trace", default=None, metavar="FILE", help="write the timeline (IO, target compute, draft, "
                   "verify/commit) as Chrome trace-event JSON (Perfetto; `llmcad trace-plot FILE` draws it; "
                   "default: none)")


def check_model_arguments(args) -> None:
    """What can be checked without loading a model: both sources (directories exist, a hub id is
    reachable), policy options, memory budget, device, dtype. Names from the model cache become their
    directories; with neither --draft nor --target, the demo pair (fetched and prepared on first use)."""
    from llmcad.cores import parse_threads
    from llmcad.models.loading import check_sources, resolve_device, resolve_dtype
    from llmcad.models.vocab import parse_draft_vocab

    resolve_model_arguments(args)
    if str(args.memory_budget).strip().lower() == "none":
        args.memory_budget = None
    check_sources(args.draft, args.target)
    from llmcad.speculative.policy import make_policy
    from llmcad.streaming.budget import resolve_budget
    from llmcad.streaming.streamer import check_bandwidth_cap

    make_policy(args.mode, **policy_options(args))
    parse_draft_vocab(getattr(args, "draft_vocab", None), "--draft-vocab")
    if args.memory_budget is not None:
        resolve_budget(args.memory_budget)
    check_bandwidth_cap(bandwidth_cap(args), "--bandwidth-cap")
    args.threads = parse_threads(args.threads, "--threads")
    args.draft_threads = parse_threads(getattr(args, "draft_threads", "auto"), "--draft-threads")
    resolve_device(args.device)
    resolve_dtype(args.dtype)


def fetch_demo_pair_once(args) -> None:
    """With neither --draft nor --target: the demo pair, fetched, imported and its draft packed now the
    first time, with progress lines of their own (so no loading line runs over them)."""
    from llmcad.models.fetch import demo_pair_ready, resolve_pair

    if args.draft is None and args.target is None and not demo_pair_ready(args.dtype):
        resolve_pair(None, None, args.dtype)


def resolve_model_arguments(args) -> None:
    """``args.draft``/``args.target`` as loadable sources: cache names resolved, the demo pair when
    neither is given."""
    from llmcad.models.fetch import resolve_pair

    if (args.draft is None) != (args.target is None):
        raise UsageError("give both --draft and --target, or neither (to use the demo pair)")
    args.draft, args.target = resolve_pair(args.draft, args.target, getattr(args, "dtype", None))


def bandwidth_cap(args):
    """--bandwidth-cap in bytes/s (None: uncapped): a plain number as it is (the streamer's checks name
    what is wrong with it), else a rate such as 300MB/s."""
    from llmcad.streaming.budget import parse_rate

    cap = getattr(args, "bandwidth_cap", None)
    if cap is None:
        return None
    try:
        return float(cap)
    except ValueError:
        return parse_rate(cap, what="--bandwidth-cap")


def check_sampling_arguments(args) -> None:
    from llmcad.engine import check_generation_options

    check_generation_options(args.max_new_tokens, stop=args.stop, **sampling_options(args))


def policy_options(args) -> dict:
    return {k: getattr(args, k) for k in POLICY_FLAGS if getattr(args, k) is not None}


def sampling_options(args) -> dict:
    sample = args.do_sample or any(v is not None for v in (args.temperature, args.top_k, args.top_p))
    return {"do_sample": sample, "temperature": 1.0 if args.temperature is None else args.temperature,
            "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}


def open_engine(args):
    """The LLMCad engine the model arguments describe (models loaded)."""
    from llmcad.engine import LLMCad

    options = policy_options(args)
    if args.max_provisional_tokens is not None:
        options["max_provisional_tokens"] = args.max_provisional_tokens
    if args.bandwidth_cap is not None:
        options["streamer_options"] = {"bandwidth_cap": bandwidth_cap(args)}
    engine = LLMCad.from_pretrained(args.draft, args.target, mode=args.mode, memory_budget=args.memory_budget,
                                    device=args.device, dtype=args.dtype, pipeline=args.pipeline,
                                    prefetch=args.prefetch, trust_remote_code=trusts_remote_code(args),
                                    prefix_cache=getattr(args, "prompt_cache", True),
                                    draft_vocab=getattr(args, "draft_vocab", None),
                                    draft_head=getattr(args, "draft_head", "auto"), threads=args.threads,
                                    draft_threads=getattr(args, "draft_threads", "auto"),
                                    **options)
    engine.draft_beside_compute = getattr(args, "draft_beside_compute", True)
    engine.prefill_beside = getattr(args, "prefill_beside", None)
    return engine


def trusts_remote_code(args) -> bool:
    """--trust-remote-code given (False for a command without the flag)."""
    return bool(getattr(args, "trust_remote_code", False))


def loading_line(live: bool, text: str = "llmcad: loading the models"):
    """``text`` with a ticking elapsed time while the block runs, on a terminal (``live``); nothing
    elsewhere."""
    from contextlib import nullcontext

    from llmcad.progress import step

    return step(text) if live else nullcontext()


def generate_prompt(args, text: str | None = None):
    """The prompt generate gets: the ids of the conversation through the target's chat template when its
    tokenizer has one (the default), else or with --raw the text itself. ``text``: the prompt's text
    when already read (else :func:`prompt_text`)."""
    from llmcad.errors import PromptError
    from llmcad.models.chat import chat_prompt_ids, has_chat_template
    from llmcad.models.loading import load_tokenizer

    text = prompt_text(args) if text is None else text
    if not text:
        raise PromptError(f"prompt is empty ({'--file ' + args.file if args.file is not None else '--prompt'})")
    if args.system is not None and args.raw:
        raise UsageError("--system needs the chat template (drop --raw)")
    tokenizer = None if args.raw else load_tokenizer(args.target, trust_remote_code=trusts_remote_code(args))
    if tokenizer is None or not has_chat_template(tokenizer):
        if args.system is not None:
            raise PromptError(f"{args.target}: --system needs a chat template, and the tokenizer has none")
        return text
    messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) + \
        [{"role": "user", "content": text}]
    return chat_prompt_ids(tokenizer, messages)


def prompt_text(args) -> str:
    """--prompt's text, stdin's for ``--prompt -``, or --file's; PromptError when it cannot be read
    as UTF-8 text."""
    from llmcad.errors import PromptError

    if args.file is None and args.prompt != "-":
        return args.prompt
    where = "stdin (--prompt -)" if args.file is None else f"--file {args.file}"
    try:
        if args.file is None:
            data = sys.stdin.buffer.read() if sys.stdin is not None else b""
        else:
            with open(args.file, "rb") as f:
                data = f.read()
        return data.decode("utf-8")
    except OSError as exc:
        raise PromptError(f"{where}: cannot read the prompt: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise PromptError(f"{where}: the prompt is not UTF-8 text (byte {exc.start})") from None


def run_generate(args) -> int:
    import time

    from llmcad.progress import first_pass_progress
    from llmcad.stats import summary

    fetch_demo_pair_once(args)
    text = prompt_text(args)  # before the loading line: stdin may be the terminal
    started = time.perf_counter()
    # a live line on a terminal only: logs and pipes keep stderr for errors and the summary
    live = not (args.quiet or args.json) and sys.stderr.isatty()
    with loading_line(live):
        check_model_arguments(args)
        quiet_transformers()
        check_sampling_arguments(args)
        prompt = generate_prompt(args, text)
        engine = open_engine(args)
    with engine:
        load_s = time.perf_counter() - started
        if live:  # the load line: the budget, its source, the floor, the plan (stats carry it everywhere)
            print(f"llmcad: {engine.describe_memory()}", file=sys.stderr)
        write, progress = first_pass_progress(engine, _stdout_writer, live=live)
        try:
            result = engine.generate(prompt, args.max_new_tokens, stop=args.stop, trace=args.trace,
                                     streamer=None if args.json else write, **sampling_options(args))
        finally:
            if progress is not None:
                progress.close()
    if args.json:
        _write(json.dumps({"text": result.text, "tokens": result.tokens, "stats": result.stats}) + "\n")
    else:
        _write("\n")
        if not args.quiet:
            print(summary(result.stats, load_s), file=sys.stderr)
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
    parser = Parser(prog=f"llmcad {command}", formatter_class=DefaultsFormatter)
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(rest)) or 0)


def dispatch(argv: list) -> int:
    command = argv[0] if argv else None
    if command in EXTERNAL:
        return run_external(EXTERNAL[command][0], command, argv[1:])
    if command == "bench":
        which = argv[1] if len(argv) > 1 else None
        if which in ("-h", "--help"):
            print(bench_help())
            return 0
        if which not in BENCH:
            _error(f"bench needs one of: {', '.join(BENCH)}")
            return 2
        return run_external(BENCH[which], f"bench {which}", argv[2:])
    return run_generate(build_parser().parse_args(argv))


def bench_help() -> str:
    lines = ["usage: llmcad bench {" + ",".join(BENCH) + "} [options]", "", "benchmarks (`llmcad bench NAME --help` "
             "for each one's options; every one takes --json):"]
    for name in BENCH:
        lines.append(f"  {name:<10} {BENCH_HELP.get(name, '')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Entry point of the ``llmcad`` script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    _escape_what_stdout_cannot_encode()
    shown = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    try:
        return dispatch(argv)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as head expects
        _silence_stdout()
        return 0
    except (LLMCadError, ValueError, OSError, ImportError) as exc:
        _error(" ".join(str(exc).split()) or type(exc).__name__)
        return 2
    except Exception as exc:  # a bug, not bad input: still one line unless LLMCAD_DEBUG asks for the traceback
        if os.environ.get("LLMCAD_DEBUG"):
            raise
        _error(f"internal error ({type(exc).__name__}): {' '.join(str(exc).split())} "
               "(set LLMCAD_DEBUG=1 for a traceback)")
        return 2
    finally:
        warnings.formatwarning = shown


def _escape_what_stdout_cannot_encode() -> None:
    """Characters stdout's encoding lacks (an ASCII-only terminal: LANG=C, PYTHONIOENCODING=ascii) are
    written as backslash escapes instead of aborting the generation mid-text."""
    stream = sys.stdout
    if stream is not None and hasattr(stream, "reconfigure") and stream.errors in ("strict", "surrogateescape"):
        stream.reconfigure(errors="backslashreplace")


def _stdout_writer(text: str) -> None:
    _write(text)


def _write(text: str) -> None:
    """Text to stdout, flushed; nothing when stdout is closed (``>&-``). A reader that went away
    raises BrokenPipeError, which main() turns into a quiet exit."""
    if sys.stdout is None:
        return
    sys.stdout.write(text)
    sys.stdout.flush()


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot complain about the pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"llmcad: warning: {' '.join(str(message).split())}\n"


def _error(message: str) -> None:
    print(f"llmcad: error: {message}", file=sys.stderr)


def quiet_transformers() -> None:
    """No progress bars or deprecation chatter around the generated text."""
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


if __name__ == "__main__":
    sys.exit(main())
