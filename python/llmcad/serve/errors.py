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
