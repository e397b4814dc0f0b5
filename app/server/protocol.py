"""uvicorn's httptools protocol with the guards it lacks against connection floods.

- A connection cap: at `max_connections` open, a new connection takes the place of the
  one idle the longest (no request in flight: fresh, between requests, or still sending
  its head or body), which is closed; when every connection has a request in flight,
  the new one gets a canned 503 (`Connection: close`) and is closed at once.
- A header-read deadline: a request head (request line and headers) must be complete
  within `header_timeout_s` of its first byte, and a new connection must send its first
  request head within `header_timeout_s` of connecting. Later bytes do not extend it,
  so sending one byte at a time (slowloris) does not help.
- A body-read deadline: the body must be complete within `body_timeout_s` of the end
  of the head.
- A keep-alive idle timeout between two requests (uvicorn's own, `idle_timeout_s`).
- A half-close (the client's shutdown(SHUT_WR) after a complete request) is not a
  disconnect: the request is answered, then the connection is closed. A client that
  closed its socket entirely sends the same FIN; it is found out by the next write (a
  `100 Continue` each PROBE_INTERVAL_S until the response starts), so its request is
  still aborted, about 2 s later than on a plain disconnect.

Nothing runs while a response is being sent: a long stream is never cut by these
deadlines. The checks cost nothing per request when the head and body arrive in one
read (no timer is armed then), and nothing per streamed token.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.server.connections import BODY_TIMEOUT, HEADER_TIMEOUT, IDLE_TIMEOUT, ConnectionBook


def _canned_response(status: str, message: str, code: str, kind: str, extra: str = "") -> bytes:
    """A complete HTTP/1.1 response with lamina's error envelope, closing the connection."""
    body = json.dumps(
        {"error": {"message": message, "type": kind, "param": None, "code": code}}
    ).encode()
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n{extra}connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


OVER_LIMIT_RESPONSE = _canned_response(
    "503 Service Unavailable", "too many open connections; retry later",
    "too_many_connections", "service_unavailable_error", extra="retry-after: 1\r\n",
)  # fmt: skip
TIMEOUT_RESPONSES = {
    reason: _canned_response(
        "408 Request Timeout",
        f"the request was not received in time ({reason})",
        reason,
        "invalid_request_error",
    )  # fmt: skip
    for reason in (HEADER_TIMEOUT, BODY_TIMEOUT)
}

# What a request that is not HTTP/1.1 gets (uvicorn's own answer is plain text).
MALFORMED_REQUEST_RESPONSE = _canned_response(
    "400 Bad Request",
    "the request is not valid HTTP/1.1: a malformed request line or header, or more bytes "
    "than its Content-Length said",
    "invalid_http_request",
    "invalid_request_error",
)

# After a half-close, how often to check that the client is still there.
PROBE_INTERVAL_S = 1.0
PROBE = b"HTTP/1.1 100 Continue\r\n\r\n"


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """One client connection (see the module doc). `book` is set per server by
    `guarded_protocol_class`."""

    book: ClassVar[ConnectionBook]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._made = False  # uvicorn's connection_made ran (not a refused connection)
        self._counted = False  # counted open in the book
        # loop.time() when the head (or body) being read began; None: not reading one.
        self._head_started_at: float | None = None
        self._body_started_at: float | None = None
        self._read_timer: asyncio.TimerHandle | None = None
        self._read_timer_reason: str | None = None
        self._any_bytes = False  # whether the client ever sent anything
        self._probe_timer: asyncio.TimerHandle | None = None  # after a half-close

    # --- connection lifetime ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        if not self.book.admit(self):
            transport.write(OVER_LIMIT_RESPONSE)  # type: ignore[attr-defined]
            transport.close()
            return
        self._counted = self._made = True
        super().connection_made(transport)  # type: ignore[arg-type]
        # A new connection is reading its first head from now on.
        self._head_started_at = self.loop.time()
        self._update_read_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        if not self._made:
            return
        self._made = False
        self._cancel_read_timer()
        if self._probe_timer is not None:
            self._probe_timer.cancel()
        super().connection_lost(exc)

    def evict(self) -> None:
        """Closed by the book at the cap to make room (no request in flight)."""
        self._release()
        self.transport.close()

    def _release(self) -> None:
        if self._counted:
            self._counted = False
            self.book.on_closed(self)

    def eof_received(self) -> bool | None:
        """The client will send no more. With a complete request still unanswered, keep
        the connection open to answer it (True), then close; otherwise close now."""
        cycle = self.cycle
        if (
            self._made
            and cycle is not None
            and not cycle.more_body
            and not cycle.response_complete
            and self._head_started_at is None
        ):
            cycle.keep_alive = False  # close once answered: nothing more can come
            if cycle.scope["http_version"] == "1.1":  # no 1xx to an HTTP/1.0 client
                self._probe_timer = self.loop.call_later(PROBE_INTERVAL_S, self._probe_peer)
            return True
        return None

    def _probe_peer(self) -> None:
        """A FIN is a half-close or a full close: only a write tells them apart (a closed
        socket answers it with a reset, and the write after that fails, which uvicorn
        reports as a disconnect, aborting the request). Until the response starts, send
        an interim `100 Continue`, which HTTP/1.1 clients must accept and skip; once it
        has started, its own writes (tokens, keep-alive comments) do the probing."""
        self._probe_timer = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None or cycle.response_started:
            return
        self.transport.write(PROBE)
        self._probe_timer = self.loop.call_later(PROBE_INTERVAL_S, self._probe_peer)

    # --- reading -----------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if not self._made:
            return
        self._any_bytes = True
        if self._between_requests():
            self._head_started_at = self.loop.time()  # these bytes begin a request head
        super().data_received(data)
        self._update_read_deadline()

    def send_400_response(self, msg: str) -> None:
        """httptools could not parse the bytes: lamina's error envelope, then close (the
        stream cannot be resynchronised)."""
        self.transport.write(MALFORMED_REQUEST_RESPONSE)
        self.transport.close()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._head_started_at = None
        pipelined = bool(self.pipeline) and self.pipeline[0][0] is self.cycle
        # A queued (pipelined) request's body is not read until its turn: no deadline yet.
        self._body_started_at = None if pipelined else self.loop.time()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._body_started_at = None
        if not self.cycle.response_complete:
            self.book.set_busy(self, True)  # a request in flight: never evicted

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            self.book.set_busy(self, False)
        elif cycle.more_body and self._body_started_at is None:
            # A pipelined request started now reads the rest of its body from now on.
            self._body_started_at = self.loop.time()
            self._update_read_deadline()

    def _between_requests(self) -> bool:
        """No head or body is being read and no response is being sent."""
        return (
            self._head_started_at is None
            and self._body_started_at is None
            and (self.cycle is None or self.cycle.response_complete)
        )

    # --- the read deadline -------------------------------------------------------------
    def _update_read_deadline(self) -> None:
        """One timer: the head's deadline while reading a head, the body's while reading
        a body, none otherwise (then uvicorn's keep-alive timer covers idleness)."""
        limits = self.book.limits
        if self.transport.is_closing():
            self._cancel_read_timer()
        elif self._head_started_at is not None:
            self._arm_read_timer(HEADER_TIMEOUT, self._head_started_at + limits.header_timeout_s)
        elif self._body_started_at is not None:
            self._arm_read_timer(BODY_TIMEOUT, self._body_started_at + limits.body_timeout_s)
        else:
            self._cancel_read_timer()

    def _arm_read_timer(self, reason: str, when: float) -> None:
        if self._read_timer is not None and self._read_timer_reason == reason:
            return  # already armed for this head or body: later bytes do not extend it
        self._cancel_read_timer()
        self._read_timer = self.loop.call_at(when, self._on_read_timeout, reason)
        self._read_timer_reason = reason

    def _cancel_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
            self._read_timer_reason = None

    def _on_read_timeout(self, reason: str) -> None:
        self._read_timer = None
        self._read_timer_reason = None
        if self.transport.is_closing():
            return
        self.book.record_closed(reason)
        cycle = self.cycle
        # A 408 only where no response has begun and the client sent something.
        responding = cycle is not None and cycle.response_started and not cycle.response_complete
        # (A new connection that never sent a byte is closed silently.)
        if not responding and self._any_bytes:
            self.transport.write(TIMEOUT_RESPONSES[reason])
        self.transport.close()

    # uvicorn's keep-alive timer: count it, then let uvicorn close.
    def timeout_keep_alive_handler(self) -> None:
        if not self.transport.is_closing():
            self.book.record_closed(IDLE_TIMEOUT)
        super().timeout_keep_alive_handler()


def guarded_protocol_class(book: ConnectionBook) -> type[GuardedHttpToolsProtocol]:
    """The protocol class for one server: uvicorn builds one instance per connection."""
    return type("LaminaHttpProtocol", (GuardedHttpToolsProtocol,), {"book": book})
