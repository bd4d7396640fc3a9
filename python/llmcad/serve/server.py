"""uvicorn around the app: a stop request (Ctrl-C, SIGTERM) first halts the worker, so the running
generation ends at its next pass boundary and open streams close, then uvicorn shuts down as usual and
the app's lifespan joins the worker and closes the engine."""
from __future__ import annotations

import uvicorn

from llmcad.serve.app import create_app
from llmcad.serve.worker import GenerationWorker

GRACEFUL_SHUTDOWN_S = 30  # then uvicorn cancels whatever request is left


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, worker: GenerationWorker):
        super().__init__(config)
        self.worker = worker

    async def shutdown(self, sockets=None) -> None:
        self.worker.halt()
        await super().shutdown(sockets)

    @property
    def port(self) -> int:
        """The port it listens on (useful with port 0: a free one)."""
        return self.servers[0].sockets[0].getsockname()[1]


def make_server(worker: GenerationWorker, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                log_level: str = "info") -> Server:
    """A server for ``worker``'s engine; it exits by itself if loading the models fails."""
    config = uvicorn.Config(create_app(worker, model_name), host=host, port=port, log_level=log_level,
                            lifespan="on", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    server = Server(config, worker)
    worker.on_load_error = lambda exc: setattr(server, "should_exit", True)
    return server
