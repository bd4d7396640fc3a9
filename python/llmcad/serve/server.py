"""uvicorn around the app: a stop request (Ctrl-C, SIGTERM, SIGHUP) first halts the worker, so the
running generation ends at its next pass boundary and open streams close, then uvicorn shuts down as
usual and the app's lifespan joins the worker and closes the engine. SIGTERM and SIGHUP then end the
process with status 0; Ctrl-C ends it as Ctrl-C does (KeyboardInterrupt). HTTP/1.1 is served by
uvicorn's h11 protocol with a read deadline and a connection cap (llmcad.serve.protocol)."""
from __future__ import annotations

import contextlib
import logging
import signal
import threading

import uvicorn

from llmcad.serve.app import create_app
from llmcad.serve.limits import Limits
from llmcad.serve.protocol import guarded_protocol
from llmcad.serve.worker import GenerationWorker

GRACEFUL_SHUTDOWN_S = 30  # then uvicorn cancels whatever request is left
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
log = logging.getLogger("llmcad.serve")


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, worker: GenerationWorker):
        super().__init__(config)
        self.worker = worker
        self.stop_signals: list = []

    async def shutdown(self, sockets=None) -> None:
        self.worker.halt()
        await super().shutdown(sockets)

    @property
    def port(self) -> int:
        """The port it listens on (useful with port 0: a free one)."""
        return self.servers[0].sockets[0].getsockname()[1]

    @contextlib.contextmanager
    def capture_signals(self):
        """uvicorn's, with SIGHUP too (a closed terminal), and without re-raising SIGTERM or SIGHUP once
        the server has shut down gracefully: only Ctrl-C is re-raised, to end as Ctrl-C does."""
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if signal.SIGINT in self.stop_signals:
            signal.raise_signal(signal.SIGINT)

    def handle_exit(self, sig, frame) -> None:
        if not self.stop_signals:
            log.info("%s: stopping (the running generation ends at its next pass)", signal.Signals(sig).name)
        self.stop_signals.append(sig)
        super().handle_exit(sig, frame)


def make_server(worker: GenerationWorker, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                log_level: str = "info", limits: Limits = Limits()) -> Server:
    """A server for ``worker``'s engine under ``limits``; it exits by itself if loading the models fails."""
    config = uvicorn.Config(create_app(worker, model_name, limits, host), host=host, port=port,
                            log_level=log_level, lifespan="on", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                            http=guarded_protocol(limits.read_timeout_s, limits.max_connections),
                            ws="none")  # no websocket routes: an upgrade request is served as plain HTTP
    server = Server(config, worker)
    worker.on_load_error = lambda exc: setattr(server, "should_exit", True)
    return server
