"""Errors the server answers with, as OpenAI shapes them: ``{"error": {message, type, param, code}}``."""
from __future__ import annotations


class APIError(Exception):
    """A request the server refuses or cannot serve; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param=None, code=None) -> APIError:
    return APIError(400, message, param=param, code=code)


def queue_full(limit: int) -> APIError:
    return APIError(429, f"the server is busy: {limit} requests are already waiting; retry later",
                    type="rate_limit_error", code="queue_full")


def not_ready(state: str) -> APIError:
    return APIError(503, f"the models are not ready ({state})", type="server_error", code="not_ready")


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")


def model_not_found(name: str, served: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist; this server serves '{served}'",
                    param="model", code="model_not_found")


def internal(exc: BaseException) -> APIError:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return APIError(500, f"generation failed ({type(exc).__name__}): {text}", type="server_error")


def no_api_key() -> APIError:
    return APIError(401, "You didn't provide an API key. This server needs one in an Authorization header "
                    "using Bearer auth (Authorization: Bearer YOUR_KEY).", code="invalid_api_key")


def wrong_api_key() -> APIError:
    return APIError(401, "Incorrect API key provided (expected Authorization: Bearer YOUR_KEY with the key the "
                    "server was started with).", code="invalid_api_key")


def bad_host(name: str, served: list) -> APIError:
    return APIError(400, f"Host {name!r} is not served here (served: {', '.join(served)}); a request naming "
                    "another host may come from a web page (DNS rebinding). Start the server with "
                    "--allowed-hosts to serve other names.", code="invalid_host")


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than the server's limit of {limit} bytes "
                    "(llmcad serve --max-body-size)", code="request_too_large")


def not_json(content_type: str | None) -> APIError:
    got = f"got {content_type!r}" if content_type else "none given"
    return APIError(415, f"the request body must be JSON with the header Content-Type: application/json ({got})",
                    code="unsupported_media_type")


def engine_failed(reason: str) -> APIError:
    return APIError(503, f"the engine cannot generate any more: {reason}; restart the server",
                    type="server_error", code="engine_failed")
