"""A request's JSON body, read within the size limit: the Content-Type must be application/json (a web
page's cross-site ``text/plain`` POST, which needs no CORS preflight, is refused), a Content-Length over
the limit is refused before any byte is read, and a body without one (chunked) is counted as it comes.
Part of llmcad.serve: must not import llmcad.bench."""
from __future__ import annotations

from starlette.requests import Request

from llmcad.serve import errors

JSON = "application/json"


async def read_json_body(request: Request, max_bytes: int) -> bytes:
    """The body (APIError 415 for another Content-Type, 413 past ``max_bytes``)."""
    content_type = request.headers.get("content-type")
    if (content_type or "").split(";")[0].strip().lower() != JSON:
        raise errors.not_json(content_type)
    length = request.headers.get("content-length")
    if length is not None and int(length) > max_bytes:  # the HTTP parser has checked it is a number
        raise errors.body_too_large(max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise errors.body_too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)
