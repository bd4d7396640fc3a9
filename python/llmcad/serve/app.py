"""The routes: /v1/completions, /v1/chat/completions (streamed as server-sent events or not),
/v1/models and /health, behind the access guard (llmcad.serve.access). A request's body is read within
the size limit on the event loop; it is parsed, checked and tokenized on one preparing thread (a long
prompt never stalls the loop, which serves every client), then queued for the one generation worker
(llmcad.serve.worker). Everything the engine would refuse is refused here, before a stream's 200."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llmcad.engine import check_generation_options
from llmcad.serve import errors, prompts, schemas
from llmcad.serve.access import AccessGuard
from llmcad.serve.body import read_json_body
from llmcad.serve.errors import APIError
from llmcad.serve.limits import Limits
from llmcad.serve.responses import Shape, sse
from llmcad.serve.worker import GenerationWorker, Job


def create_app(worker: GenerationWorker, model_name: str, limits: Limits = Limits(),
               bind_host: str = "127.0.0.1") -> Starlette:
    """The ASGI app serving ``worker``'s engine as ``model_name`` under ``limits`` (its Host names
    depend on ``bind_host``); the app's lifespan starts the worker (which loads the models) and stops it
    (cancelling what runs, then closing the engine)."""
    api = _API(worker, model_name, limits)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)
            api.preparing.shutdown(wait=True, cancel_futures=True)

    routes = [Route("/v1/completions", api.completions, methods=["POST"]),
              Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
              Route("/v1/models", api.models, methods=["GET"]),
              Route("/v1/models/{model:path}", api.model, methods=["GET"]),
              Route("/health", api.health, methods=["GET"])]
    handlers = {HTTPException: _http_error, Exception: _unexpected_error}
    guard = Middleware(AccessGuard, hosts=limits.host_names(bind_host), api_key=limits.api_key)
    return Starlette(routes=routes, middleware=[guard], lifespan=lifespan, exception_handlers=handlers)


class _API:
    def __init__(self, worker: GenerationWorker, model_name: str, limits: Limits):
        self.worker, self.model_name, self.limits = worker, model_name, limits
        self.created = int(time.time())
        # one thread: the tokenizer copy must not be used by two threads at once
        self.preparing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llmcad-serve-prepare")

    async def completions(self, request: Request):
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request):
        return await self._generate(request, chat=True)

    async def models(self, request: Request):
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request):
        name = request.path_params["model"]
        if name != self.model_name:
            return _error(errors.model_not_found(name, self.model_name))
        return JSONResponse(self._model_card())

    async def health(self, request: Request):
        w = self.worker
        body = {"status": w.state, "model": self.model_name,
                "queue": {"waiting": len(w.queue), "limit": w.queue.limit}, "running": w.running is not None,
                "requests": {k: w.counts[k] for k in ("finished", "cancelled", "failed")}}
        if w.failure is not None:
            body["error"] = w.failure
        return JSONResponse(body, status_code=200 if w.state == "ready" else 503)

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "llmcad"}

    async def _generate(self, request: Request, chat: bool):
        try:
            body = await read_json_body(request, self.limits.max_body_bytes)
            prepared = await asyncio.get_running_loop().run_in_executor(self.preparing, self._prepare, body, chat)
            job = Job(*prepared, loop=asyncio.get_running_loop())
            self.worker.submit(job)
        except APIError as exc:
            return _error(exc)
        except ClientDisconnect:
            return Response(status_code=499)  # nobody reads it
        shape = Shape(chat, self.model_name)
        if job.params.stream:
            return _JobStream(self._events(job, shape), self.worker, job)
        return await self._wait(request, job, shape)

    def _prepare(self, body: bytes, chat: bool) -> tuple:
        """The checked request as Job's first fields (prompt, prompt_tokens, max_new_tokens, params), on
        the preparing thread; APIError 400/404/503 otherwise: what ``engine.generate`` would refuse."""
        req = schemas.parse(schemas.ChatCompletionRequest if chat else schemas.CompletionRequest, body)
        if req.model != self.model_name:
            raise errors.model_not_found(req.model, self.model_name)
        schemas.refuse_unsupported(req)
        requested = schemas.chat_max_tokens(req) if chat else req.max_tokens
        params = schemas.params(req, requested)
        frontend = self.worker.frontend
        if frontend is None or self.worker.state != "ready":
            raise self.worker.refusal()
        if chat:
            prompt = schemas.chat_messages(req)
            ids = prompts.chat_ids(frontend, prompt)
            default = None
        else:
            prompt = ids = prompts.completion_ids(frontend, req.prompt)
            default = prompts.COMPLETION_DEFAULT_MAX_TOKENS
        param = "messages" if chat else "prompt"
        n = prompts.max_new_tokens(len(ids), requested, frontend.context_length, default, param)
        prompts.check_kv_room(len(ids), frontend.kv_positions, param)
        try:
            check_generation_options(n, **params.engine_kwargs())
        except ValueError as exc:
            raise errors.bad_request(" ".join(str(exc).split())) from None
        return prompt, len(ids), n, params

    async def _events(self, job: Job, shape: Shape):
        """The SSE body: the role (chat), text deltas, the finish reason, usage if asked, ``[DONE]``;
        an error after the stream began is sent as an ``{"error": ...}`` event, as OpenAI does."""
        while True:
            kind, value = await job.events.get()
            if kind == "start":
                if shape.chat:
                    yield sse(shape.chunk(role=True))
            elif kind == "text":
                yield sse(shape.chunk(value))
            elif kind == "done":
                yield sse(shape.chunk(finish_reason=value.finish_reason))
                if job.params.include_usage:
                    yield sse(shape.usage_chunk(value))
                yield sse("[DONE]")
                return
            else:
                yield sse(value.body())
                return

    async def _wait(self, request: Request, job: Job, shape: Shape):
        """The whole response once the job is done; a client that leaves first withdraws the job."""
        disconnected = asyncio.ensure_future(_disconnect(request))
        try:
            while True:
                event = asyncio.ensure_future(job.events.get())
                await asyncio.wait({event, disconnected}, return_when=asyncio.FIRST_COMPLETED)
                if not event.done():
                    event.cancel()
                    return JSONResponse({}, status_code=499)  # nobody reads it
                kind, value = event.result()
                if kind == "done":
                    return JSONResponse(shape.response(value))
                if kind == "error":
                    return _error(value)
        finally:
            disconnected.cancel()
            self.worker.withdraw(job)


class _JobStream(StreamingResponse):
    """An SSE response that withdraws its job however it ends (done, client gone, server stopping)."""

    def __init__(self, events, worker: GenerationWorker, job: Job):
        super().__init__(events, media_type="text/event-stream", headers={"cache-control": "no-cache"})
        self.events, self.worker, self.job = events, worker, job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.worker.withdraw(self.job)
            await self.events.aclose()


async def _disconnect(request: Request) -> None:
    """Returns when the client has gone (the body has been read, so only http.disconnect can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    kind = "not_found" if exc.status_code == 404 else None
    return _error(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=kind))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    return _error(errors.internal(exc))
