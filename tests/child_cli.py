"""`llmcad` in a child process that takes Ctrl-C as a terminal user's would: SIGINT raises
KeyboardInterrupt even when the suite was started with SIGINT ignored (under nohup or `&`), a
disposition the child would otherwise inherit."""
import os
import signal
import sys
import time
from pathlib import Path

import llmcad

def child_env(**overrides: str) -> dict:
    """os.environ for a child that imports the llmcad under test (source tree or site-packages) and
    the test helpers, whatever PYTHONPATH the suite was started with."""
    paths = [str(Path(llmcad.__file__).resolve().parents[1]), str(Path(__file__).resolve().parent),
             os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), **overrides}


LLMCAD_WITH_SIGINT = [sys.executable, "-c", "import signal, sys; signal.signal(signal.SIGINT, "
                      "signal.default_int_handler); from llmcad.cli import main; sys.exit(main(sys.argv[1:]))"]


def interrupt_and_expect_clean_exit(proc, wait_s: float, ready=lambda: None) -> None:
    """Call ``ready()`` (it waits until the child is where the test wants it), send SIGINT, and
    assert the child exits with 130 within 10 s and no traceback. The child is killed if it is
    still running when this returns or raises."""
    try:
        ready()
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        rc = proc.wait(timeout=wait_s)
        assert time.monotonic() - t0 < 10  # mostly the interpreter's own teardown of torch
        err = proc.stderr.read().decode()
        assert rc == 130 and "Traceback" not in err, (rc, err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# `llmcad ARGS --memory-budget LEAST` where LEAST is the least budget this very process accepts for the
# pair named by --draft/--target (the runtime floor is measured once per process, so it is the same
# floor): every target layer streams
LLMCAD_AT_THE_LEAST_BUDGET = [sys.executable, "-c", """
import re, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from llmcad import LLMCad
from llmcad.cli import main
from llmcad.errors import BudgetError
args = sys.argv[1:]
try:
    LLMCad.from_pretrained(args[args.index("--draft") + 1], args[args.index("--target") + 1], memory_budget=1)
except BudgetError as err:
    least = re.search(r"needs at least [^(]*\\((\\d+) bytes\\)", str(err)).group(1)
sys.exit(main(args + ["--memory-budget", least]))
"""]
