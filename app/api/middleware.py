"""BodyGuard, the ASGI middleware that reads request bodies before the app does (pure
ASGI: streaming and disconnects pass through).

- 413 for a body over Settings.max_body_bytes, from the Content-Length header when
  there is one, otherwise while reading a chunked body;
- 400 for a POST/PUT/PATCH body with a lone UTF-16 surrogate escape (unicode_guard.py).

A body it read is replayed to the app. Request ids, access logs and HTTP metrics:
ObservabilityMiddleware (observability.py).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import APIError, error_response, invalid_request
from app.api.unicode_guard import lone_surrogate_offset

BODY_METHODS = ("POST", "PUT", "PATCH")  # bodies the routes parse as JSON


def _too_large(limit_bytes: int, got: str) -> APIError:
    return APIError(
        413,
        f"request body is {got}; at most {limit_bytes} bytes are allowed",
        type="invalid_request_error",
        code="request_too_large",
    )


def _lone_surrogate(offset: int) -> APIError:
    return invalid_request(
        f"request body is not valid Unicode text: a lone UTF-16 surrogate escape at "
        f"byte {offset}; strings must be valid Unicode",
        code="invalid_unicode",
    )


class BodyGuard:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(_too_large(limit, f"{int(declared)} bytes"), scope, receive, send)
            return
        scanned = scope["method"] in BODY_METHODS
        if declared is not None and not scanned:
            await self.app(scope, receive, send)  # bounded, and nothing to scan
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > limit:
                error = _too_large(limit, f"at least {size} bytes")
                await self._refuse(error, scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        if scanned:
            body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")
            offset = lone_surrogate_offset(body)
            if offset is not None:
                await self._refuse(_lone_surrogate(offset), scope, receive, send)
                return
        await self.app(scope, replay(messages, receive), send)

    @staticmethod
    async def _refuse(error: APIError, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(error, scope.get("path"))(scope, receive, send)


def replay(messages: list[Message], receive: Receive) -> Receive:
    """A receive() that returns `messages` first, then defers to the real one."""
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed
