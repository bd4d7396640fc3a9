"""uvicorn's HTTP/1.1 protocol (h11) with two guards uvicorn lacks: a client has ``read_timeout_s`` to
send a whole request (head and body) from the moment the server waits for one, so clients that trickle
bytes (slowloris) are answered 408 and dropped, and at most ``max_connections`` are open at once (more
are answered 503 and closed at once, before they can use up the process's file descriptors).
Part of llmcad.serve: must not import llmcad.bench."""
from __future__ import annotations

import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("llmcad.serve")
_AWAITED = (h11.IDLE, h11.SEND_BODY)  # the client's states while it owes the server (part of) a request


def guarded_protocol(read_timeout_s: float, max_connections: int) -> type:
    """The protocol class to give uvicorn (``Config(http=...)``) for these limits."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"read_timeout_s": read_timeout_s, "max_connections": max_connections})


class GuardedH11Protocol(H11Protocol):
    read_timeout_s: float
    max_connections: int

    def connection_made(self, transport) -> None:
        self._deadline = None
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning("refused a connection: %d are open already", self.max_connections)
            self._answer_and_close(503, "Service Unavailable", f"the server has {self.max_connections} "
                                   "connections open, its limit; retry later", "too_many_connections")
            return
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def _watch(self) -> None:
        """Arm the deadline when the server starts waiting for a request; disarm it once one is in."""
        if self.transport.is_closing() or self.conn.their_state not in _AWAITED:
            self._cancel_deadline()
        elif self._deadline is None:
            self._deadline = self.loop.call_later(self.read_timeout_s, self._timed_out)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.conn.their_state not in _AWAITED:
            return
        if self.conn.their_state is h11.IDLE:  # waiting for a head: is part of one in?
            answer = bool(self.conn.trailing_data[0])
        else:  # a body: unless the app has answered already (413 for one, its rest then read and dropped)
            answer = self.cycle is None or not self.cycle.response_started
        if answer:
            self._answer_and_close(408, "Request Timeout", f"the request was not received within "
                                   f"{self.read_timeout_s:g} s (llmcad serve --read-timeout)", "request_timeout")
        else:  # an idle connection, or one already answered: closed without a word
            self.transport.close()

    def _answer_and_close(self, status: int, reason: str, message: str, code: str) -> None:
        """A JSON error written past h11 (whose state may not allow a response yet), then close."""
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": code}}).encode()
        head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}"
                "\r\nconnection: close\r\n\r\n").encode()
        self.transport.write(head + body)
        self.transport.close()
