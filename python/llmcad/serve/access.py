"""Who may use the server, checked before any route runs: the Host header (a web page that resolves
its own name to 127.0.0.1, DNS rebinding, sends its own name) and the API key (``Authorization: Bearer
KEY``, as OpenAI, llama-server and vLLM take it; compared in constant time). ``/health`` needs no key.
Part of llmcad.serve: must not import llmcad.bench."""
from __future__ import annotations

import hmac

from starlette.responses import JSONResponse

from llmcad.serve import errors
from llmcad.serve.limits import host_name

OPEN_PATHS = ("/health",)  # served without the API key


class AccessGuard:
    """ASGI middleware: answers 400 for a Host name not in ``hosts`` (None: any) and 401 for a request
    without the API key ``api_key`` (None: none asked), with OpenAI's error body."""

    def __init__(self, app, hosts: frozenset | None, api_key: str | None):
        self.app, self.hosts = app, hosts
        self.key = api_key.encode() if api_key is not None else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            error = self._refusal(scope)
            if error is not None:
                headers = {"www-authenticate": "Bearer"} if error.status == 401 else None
                await JSONResponse(error.body(), error.status, headers=headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope) -> errors.APIError | None:
        headers = dict(scope["headers"])  # lower-case names (ASGI)
        host = headers.get(b"host")
        if self.hosts is not None and host is not None:
            name = host_name(host.decode("latin-1"))
            if name not in self.hosts:
                return errors.bad_host(name, sorted(self.hosts))
        if self.key is not None and scope["path"] not in OPEN_PATHS:
            return self._key_refusal(headers.get(b"authorization"))
        return None

    def _key_refusal(self, authorization: bytes | None) -> errors.APIError | None:
        if authorization is None:
            return errors.no_api_key()
        scheme, _, token = authorization.strip().partition(b" ")
        given = token.strip() if scheme.lower() == b"bearer" else b""
        return None if hmac.compare_digest(given, self.key) else errors.wrong_api_key()
