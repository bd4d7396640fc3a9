"""``llmcad chat``: a conversation with a chat model. Each line read is a user message; the whole
conversation goes through the target's chat template and the reply streams as it is generated.
"""
from __future__ import annotations

import argparse
import sys

HELP = "type a message and press Enter; /reset starts a new conversation, /exit or Ctrl-D ends"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llmcad.cli import add_model_arguments, add_prompt_cache_argument, add_sampling_arguments

    p.description = (f"Talk with a chat model ({HELP}). Each turn reuses the KV of the conversation so far "
                     "(the template's rendering is compared token by token: an edited history reuses the common "
                     "prefix), so only the new tokens are prefilled.")
    add_model_arguments(p)
    add_prompt_cache_argument(p)
    p.add_argument("--system", default=None, help="a system message that opens the conversation")
    add_sampling_arguments(p)
    p.add_argument("--stats", action="store_true", help="a timing summary on stderr after each reply")


def run(args: argparse.Namespace) -> int:
    from llmcad.cli import (check_model_arguments, check_sampling_arguments, fetch_demo_pair_once, loading_line,
                            open_engine, quiet_transformers, sampling_options, trusts_remote_code)
    from llmcad.errors import PromptError
    from llmcad.models.chat import has_chat_template
    from llmcad.models.loading import load_tokenizer
    from llmcad.progress import first_pass_progress
    from llmcad.stats import summary

    fetch_demo_pair_once(args)
    with loading_line(sys.stderr.isatty()):
        check_model_arguments(args)
        quiet_transformers()
        check_sampling_arguments(args)
        if not has_chat_template(load_tokenizer(args.target, trust_remote_code=trusts_remote_code(args))):
            raise PromptError(f"{args.target}: the tokenizer has no chat template, so `llmcad chat` cannot format "
                              "a conversation for it; use `llmcad generate --prompt` for a base model")
        engine = open_engine(args)
    opening = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(opening)
    with engine:
        print(f"llmcad chat: {HELP}", file=sys.stderr)
        while (line := _read_message()) is not None:
            if line in ("/exit", "/quit"):
                break
            if line == "/reset":
                messages = list(opening)
                continue
            if not line:
                continue
            messages.append({"role": "user", "content": line})
            write, progress = first_pass_progress(engine, _write, live=sys.stderr.isatty())
            try:
                result = engine.generate(messages, args.max_new_tokens, stop=args.stop, streamer=write,
                                         **sampling_options(args))
            except PromptError as exc:  # the conversation outgrew the context
                messages.pop()
                print(f"llmcad chat: {' '.join(str(exc).split())}; /reset to start over", file=sys.stderr)
                continue
            finally:
                if progress is not None:
                    progress.close()
            _write("\n" if sys.stdin.isatty() else "\n\n")  # piped: a blank line between replies
            messages.append({"role": "assistant", "content": result.text})
            if args.stats:
                print(summary(result.stats), file=sys.stderr)
    return 0


def _read_message():
    """The next line from stdin without its newline (a "> " prompt on a terminal); None at end of input."""
    if sys.stdin.isatty():
        _write("> ")
    line = sys.stdin.readline()
    return None if not line else line.strip()


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
