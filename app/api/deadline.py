"""Per-request deadlines: the `X-Request-Timeout` header, LAMINA_REQUEST_TIMEOUT_S, and
the errors a client sees when its request is stopped early.

A request's deadline starts when it is admitted (`Deadline.after`), and the route
driver's run keeps it (driver.py). The header (seconds, a positive finite
number) can only shorten the server's timeout; without a server timeout it sets one of
at most MAX_REQUEST_TIMEOUT_S. On expiry the request is aborted in the engine (its KV
blocks are freed at the next step) and the client gets:

- before the answer started (non-streaming): HTTP 504, code `request_timeout`;
- while streaming (the status 200 is already sent): an error event with the same
  envelope, then `data: [DONE]`.

The drain (app/api/drain.py) stops what is still running when LAMINA_DRAIN_TIMEOUT_S
passes the same way, with a 503 `request_aborted` envelope.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

from app.api.errors import APIError, invalid_request, service_unavailable

TIMEOUT_HEADER = "X-Request-Timeout"
MAX_REQUEST_TIMEOUT_S = 24 * 3600.0


def parse_timeout_header(raw: str | None) -> float | None:
    """The header's value in seconds, or None when absent; a 400 when it is not valid."""
    if raw is None:
        return None
    try:
        value = float(raw.strip())
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= MAX_REQUEST_TIMEOUT_S):
        shown = raw if len(raw) <= 40 else raw[:37] + "..."
        raise invalid_request(
            f"header `{TIMEOUT_HEADER}` must be a number of seconds in (0, "
            f"{MAX_REQUEST_TIMEOUT_S:.0f}] (got {shown!r})",
            param=TIMEOUT_HEADER,
        )
    return value


def effective_timeout_s(header_s: float | None, server_s: float | None) -> float | None:
    """The request's timeout: the shorter of the header's and the server's (either may
    be absent; a client cannot extend the server's limit)."""
    if header_s is None:
        return server_s
    if server_s is None:
        return header_s
    return min(header_s, server_s)


@dataclass(frozen=True)
class Deadline:
    """When a request must have finished, on the event loop's clock."""

    timeout_s: float
    at: float  # asyncio loop.time()

    @classmethod
    def after(cls, timeout_s: float | None) -> Deadline | None:
        if timeout_s is None:
            return None
        return cls(timeout_s, asyncio.get_running_loop().time() + timeout_s)


def deadline_exceeded(timeout_s: float) -> APIError:
    """What a request that ran past its deadline reports (status 504, or in the stream)."""
    return APIError(
        504,
        f"the request did not finish within its deadline of {timeout_s:g} s and was "
        f"stopped (server limit LAMINA_REQUEST_TIMEOUT_S, per request `{TIMEOUT_HEADER}`)",
        type="timeout_error",
        code="request_timeout",
    )


def drain_timeout_exceeded(drain_timeout_s: float) -> APIError:
    """What a request still running when the drain gives up reports."""
    return service_unavailable(
        f"the server is shutting down and the request did not finish within the drain "
        f"timeout of {drain_timeout_s:g} s; retry it on another replica",
        code="request_aborted",
    )
