"""What the server accepts from clients: the API key, the request body size, the Host names, the time a
client has to send a request, and the connections held at once. Imports nothing from llmcad."""
from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

DEFAULT_MAX_BODY_BYTES = 4 << 20  # a request body (JSON); more is answered 413
DEFAULT_READ_TIMEOUT_S = 30.0  # to send a request's head and body, from the moment the server waits for one
DEFAULT_MAX_CONNECTIONS = 256  # open at once; more are answered 503 and closed
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Limits:
    """``api_key``: None = no key asked. ``allowed_hosts``: Host header names served besides the loopback
    names (no port; "*": any); None = the loopback names only when the server is bound to loopback, any
    name otherwise."""

    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    allowed_hosts: tuple | None = None
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    def __post_init__(self):
        if self.api_key is not None and not self.api_key:
            raise ValueError("the API key is empty")
        checks = [("max body size", self.max_body_bytes), ("read timeout", self.read_timeout_s),
                  ("max connections", self.max_connections)]
        for what, value in checks:
            if isinstance(value, bool) or not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{what} {value!r}: expected a finite number > 0")

    def host_names(self, bind_host: str) -> frozenset | None:
        """The Host names served for a server bound to ``bind_host``; None = any."""
        if self.allowed_hosts is None:
            return frozenset(LOOPBACK_NAMES) if is_loopback(bind_host) else None
        names = {h.strip().lower().strip("[]") for h in self.allowed_hosts if h.strip()}
        return None if "*" in names else frozenset(names | set(LOOPBACK_NAMES))


def is_loopback(host: str) -> bool:
    """``host`` (an address to bind) reaches this machine only: localhost, 127.0.0.0/8, ::1."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name of a Host header, without its port: 'localhost:8000' -> 'localhost', '[::1]:80' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header
