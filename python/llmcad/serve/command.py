"""``llmcad serve``: load a draft/target pair (the demo pair when none is given) and serve it over an
OpenAI-compatible HTTP API until Ctrl-C, SIGTERM or SIGHUP."""
from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import sys
from pathlib import Path

from llmcad.cli import (add_model_arguments, add_prompt_cache_argument, check_model_arguments, fetch_demo_pair_once,
                        loading_line, open_engine, quiet_transformers)
from llmcad.errors import LLMCadError, ModelLoadError

DEFAULT_MAX_QUEUE = 16
NEEDS = ("starlette", "uvicorn", "pydantic")  # the serve extra
API_KEY_ENV = "LLMCAD_API_KEY"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Serve a draft/target pair over an OpenAI-compatible HTTP API (/v1/completions, "
                     "/v1/chat/completions, /v1/models, /health), one generation at a time. With no "
                     "--draft/--target it serves the demo pair, as `llmcad demo` runs it.")
    add_model_arguments(p)
    add_prompt_cache_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: any free port)")
    p.add_argument("--model-name", default=None, help="the model id clients ask for (default: the name of the "
                   "target's directory)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, help="requests that may wait while one "
                   f"generates; more are answered 429 (default {DEFAULT_MAX_QUEUE})")
    _add_limit_arguments(p)
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")


def _add_limit_arguments(p: argparse.ArgumentParser) -> None:
    from llmcad.serve import limits

    p.add_argument("--api-key", default=None, help="requests must send 'Authorization: Bearer KEY' (GET /health "
                   f"excepted); default: the environment variable {API_KEY_ENV} (which, unlike an argument, other "
                   "users cannot read in the process list), else no key")
    p.add_argument("--allowed-hosts", default=None, metavar="NAMES", help="comma-separated Host names served "
                   "besides localhost, 127.0.0.1 and ::1 ('*': any); default: only those when listening on "
                   "loopback, any otherwise")
    p.add_argument("--max-body-size", default=f"{limits.DEFAULT_MAX_BODY_BYTES >> 20}MiB", metavar="SIZE",
                   help="largest request body; larger ones get 413 (default %(default)s)")
    p.add_argument("--read-timeout", type=float, default=limits.DEFAULT_READ_TIMEOUT_S, metavar="S",
                   help="seconds a client has to send a whole request; slower ones get 408 (default %(default)g)")
    p.add_argument("--max-connections", type=int, default=limits.DEFAULT_MAX_CONNECTIONS, metavar="N",
                   help="connections open at once; more get 503 (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    _require_extra()
    if args.max_queue < 0:
        raise ValueError(f"--max-queue {args.max_queue}: expected an int >= 0")
    limits = _limits(args)
    fetch_demo_pair_once(args)
    with loading_line(sys.stderr.isatty(), "llmcad serve: checking the models"):
        check_model_arguments(args)
    name = args.model_name or Path(str(args.target).rstrip("/")).name
    quiet_transformers()
    _log_to_stderr(args.log_level)

    from llmcad.serve.server import make_server
    from llmcad.serve.worker import GenerationWorker

    worker = GenerationWorker(lambda: open_engine(args), args.max_queue)
    server = make_server(worker, name, args.host, args.port, args.log_level, limits)
    warning = bind_warning(args.host, limits.api_key)
    if warning:
        print(f"llmcad serve: {warning}", file=sys.stderr)
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


def _limits(args):
    from llmcad.serve.limits import Limits
    from llmcad.streaming.budget import parse_size

    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if key is not None and not key.strip():
        raise ValueError("--api-key: the key is empty")
    hosts = tuple(args.allowed_hosts.split(",")) if args.allowed_hosts is not None else None
    if hosts is not None and not any(h.strip() for h in hosts):
        raise ValueError(f"--allowed-hosts {args.allowed_hosts!r}: expected comma-separated host names, or '*'")
    if not (args.read_timeout > 0 and math.isfinite(args.read_timeout)):
        raise ValueError(f"--read-timeout {args.read_timeout:g}: expected a finite number of seconds > 0")
    if args.max_connections < 1:
        raise ValueError(f"--max-connections {args.max_connections}: expected an int >= 1")
    return Limits(api_key=key, max_body_bytes=parse_size(args.max_body_size, "--max-body-size"),
                  allowed_hosts=hosts, read_timeout_s=args.read_timeout, max_connections=args.max_connections)


def bind_warning(host: str, api_key) -> str | None:
    """What to tell the user who listens beyond loopback (None on loopback)."""
    from llmcad.serve.limits import is_loopback

    if is_loopback(host):
        return None
    if api_key is None:
        return (f"WARNING: listening on {host}, beyond this machine, with NO API KEY: anyone who can reach "
                f"this port can use the models and this machine. Give --api-key (or {API_KEY_ENV}), or listen "
                "on 127.0.0.1.")
    return (f"warning: listening on {host}, beyond this machine; requests need the API key, which plain HTTP "
            "sends unencrypted (put a TLS proxy in front beyond a trusted network).")


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
