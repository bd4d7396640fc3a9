"""Silent waits of the everyday commands, as a user at a terminal sees them: each command runs with
stderr on a pseudo-terminal (so its live lines draw) and stdout on a pipe (the generated text); the
report gives, per command, the longest time with no output at all before the first generated text
(the stages: loading, the first pass) and after it (between passes, while text streams). For
``serve`` the first text is its ``models loaded: ready`` line (after it, an idle server is silent).

    PYTHONPATH=python python benchmarks/silent_waits.py [--max-new-tokens 24] [--only generate,chat] \
        [--out benchmarks/results/silent_waits.json]

The commands are the README's, with no paths and no environment variables: the demo pair from the
cache (run `llmcad demo` once first, or the first command here fetches it).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import selectors
import shlex
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

from llmcad.bench.e2e import git_commit

LLMCAD = [sys.executable, "-m", "llmcad.cli"]


READY = b"models loaded: ready"  # serve's first output that answers a user: it counts as its first text


def commands(tokens: int) -> dict:
    """name -> (argv, stdin text, seconds after which SIGINT ends it, or None)."""
    n = str(tokens)
    return {"demo": (LLMCAD + ["demo", "--max-new-tokens", n], "", None),
            "generate": (LLMCAD + ["generate", "--prompt", "Write fizzbuzz in Python.", "--max-new-tokens", n], "", None),
            "generate, 2.5 GiB": (LLMCAD + ["generate", "--prompt", "Write fizzbuzz in Python.", "--max-new-tokens", n,
                                            "--memory-budget", "2.5GiB"], "", None),
            "chat": (LLMCAD + ["chat", "--max-new-tokens", n], "Say hi.\nNow say bye.\n", None),
            "serve (start)": (LLMCAD + ["serve", "--port", "0"], "", 45.0)}


def watch(argv: list, stdin_text: str, stop_after: float | None) -> dict:
    """Run ``argv``; times of output chunks on stderr (a 40x160 pseudo-terminal) and stdout (a pipe)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    proc.stdin.write(stdin_text.encode())
    proc.stdin.close()
    sel = selectors.DefaultSelector()
    sel.register(master, selectors.EVENT_READ, "stderr")
    sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
    started, events, open_streams = time.monotonic(), [], 2
    while open_streams:
        if stop_after is not None and time.monotonic() - started > stop_after and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            stop_after = None
        for key, _ in sel.select(timeout=0.5):
            try:
                data = os.read(key.fd if key.data == "stderr" else proc.stdout.fileno(), 65536)
            except OSError:
                data = b""
            if not data:
                sel.unregister(key.fileobj)
                open_streams -= 1
                continue
            events.append((time.monotonic() - started, "stdout" if READY in data else key.data))
    proc.wait()
    return {"exit_status": proc.returncode, "seconds": time.monotonic() - started, "events": events}


def gaps(run: dict) -> dict:
    """Longest silence (s) before the first stdout text and after it, and where it ended."""
    first_text = next((t for t, stream in run["events"] if stream == "stdout"), None)
    times = [0.0] + [t for t, _ in run["events"]] + [run["seconds"]]
    before, after = (0.0, 0.0), (0.0, 0.0)
    for a, b in zip(times, times[1:]):
        if first_text is None or b <= first_text:
            before = max(before, (b - a, b))
        else:
            after = max(after, (b - a, b))
    return {"first_text_s": None if first_text is None else round(first_text, 1), "longest_before_text_s": round(before[0], 2), "ended_at_s": round(before[1], 1),
            "longest_while_text_streams_s": round(after[0], 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--only", default=None, help="comma-separated command names")
    p.add_argument("--out", default="benchmarks/results/silent_waits.json")
    args = p.parse_args(argv)
    chosen = commands(args.max_new_tokens)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    rows = []
    for name, (cmd, stdin_text, stop_after) in chosen.items():
        run = watch(cmd, stdin_text, stop_after)
        rows.append({"command": name, "argv": shlex.join(cmd[2:]), "exit_status": run["exit_status"],
                     "seconds": round(run["seconds"], 1), **gaps(run)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    report = {"command": "python benchmarks/silent_waits.py " + shlex.join(sys.argv[1:] if argv is None else argv),
              "git_commit": git_commit(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    lines = ["| command | exit | longest silence before the first text (s) | first text at (s) | "
             "longest silence while text streams (s) |", "|---|--:|--:|--:|--:|"]
    lines += [f"| `{r['argv']}` | {r['exit_status']} | {r['longest_before_text_s']} | {r['first_text_s'] or '—'} | "
              f"{r['longest_while_text_streams_s']} |" for r in rows]
    Path(args.out).with_suffix(".md").write_text(f"Command: `{report['command']}` at {report['git_commit']}.\n\n"
                                                 + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
