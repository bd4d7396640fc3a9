"""``llmcad serve``: load a draft/target pair (the demo pair when none is given) and serve it over an
OpenAI-compatible HTTP API until Ctrl-C or SIGTERM."""
from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

from llmcad.cli import (add_model_arguments, add_prompt_cache_argument, check_model_arguments, open_engine,
                        quiet_transformers)
from llmcad.errors import LLMCadError, ModelLoadError

DEFAULT_MAX_QUEUE = 16
NEEDS = ("starlette", "uvicorn", "pydantic")  # the serve extra


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llmcad.demo import DEFAULT_BUDGET

    p.description = ("Serve a draft/target pair over an OpenAI-compatible HTTP API (/v1/completions, "
                     "/v1/chat/completions, /v1/models, /health), one generation at a time. With no "
                     "--draft/--target it serves the demo pair, as `llmcad demo` runs it.")
    add_model_arguments(p, required=False, budget_default=f"{DEFAULT_BUDGET} for the demo pair, else keep the "
                        "target resident; 'none' keeps it resident")
    add_prompt_cache_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: any free port)")
    p.add_argument("--model-name", default=None, help="the model id clients ask for (default: the name of the "
                   "target's directory)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, help="requests that may wait while one "
                   f"generates; more are answered 429 (default {DEFAULT_MAX_QUEUE})")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")


def run(args: argparse.Namespace) -> int:
    _require_extra()
    if (args.draft is None) != (args.target is None):
        raise ValueError("give both --draft and --target, or neither (to serve the demo pair)")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue {args.max_queue}: expected an int >= 0")
    _use_demo_pair_unless_given(args)
    check_model_arguments(args)
    name = args.model_name or Path(str(args.target).rstrip("/")).name
    quiet_transformers()
    _log_to_stderr(args.log_level)

    from llmcad.serve.server import make_server
    from llmcad.serve.worker import GenerationWorker

    worker = GenerationWorker(lambda: open_engine(args), args.max_queue)
    server = make_server(worker, name, args.host, args.port, args.log_level)
    print(f"llmcad serve: loading draft {args.draft}, target {args.target} (mode {args.mode}, memory budget "
          f"{args.memory_budget or 'none'}) as model '{name}'; GET /health says when it is ready", file=sys.stderr)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits on a port it cannot bind (it has logged why)
        raise OSError(f"the server could not start on {args.host}:{args.port} (exit status {exc.code})") from None
    if worker.load_error is not None:
        error = worker.load_error
        raise error if isinstance(error, (LLMCadError, OSError, ValueError)) else ModelLoadError(str(error))
    return 0


def _use_demo_pair_unless_given(args) -> None:
    """Without --draft/--target: the demo pair (fetched and prepared on first use) and its memory budget."""
    from llmcad.demo import DEFAULT_BUDGET

    if args.draft is None:
        from llmcad.models.fetch import MANUAL_HELP, ensure_real_pair

        try:
            args.draft, args.target = (str(p) for p in ensure_real_pair("bfloat16"))
        except (LLMCadError, OSError) as exc:
            raise ModelLoadError(f"could not get the demo pair: {' '.join(str(exc).split())}; {MANUAL_HELP}") \
                from None
        if args.memory_budget is None:
            args.memory_budget = DEFAULT_BUDGET
    if str(args.memory_budget).lower() == "none":
        args.memory_budget = None


def _require_extra() -> None:
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"llmcad serve needs {', '.join(missing)}: pip install \"llmcad[serve]\"")


def _log_to_stderr(level: str) -> None:
    logger = logging.getLogger("llmcad.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("llmcad serve: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())
