"""`llmcad` in a child process that takes Ctrl-C as a terminal user's would: SIGINT raises
KeyboardInterrupt even when the suite was started with SIGINT ignored (under nohup or `&`), a
disposition the child would otherwise inherit."""
import sys

LLMCAD_WITH_SIGINT = [sys.executable, "-c", "import signal, sys; signal.signal(signal.SIGINT, "
                      "signal.default_int_handler); from llmcad.cli import main; sys.exit(main(sys.argv[1:]))"]
