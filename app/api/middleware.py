"""ASGI middleware of the HTTP layer (pure ASGI: streaming and disconnects pass through).

`BodySizeLimit` answers 413 for a body over Settings.max_body_bytes, from the
Content-Length header when there is one, otherwise while reading a chunked body.
Request ids, access logs and HTTP metrics: ObservabilityMiddleware (observability.py).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import APIError, error_response


def _too_large(limit_bytes: int, got: str) -> APIError:
    return APIError(
        413,
        f"request body is {got}; at most {limit_bytes} bytes are allowed",
        type="invalid_request_error",
        code="request_too_large",
    )


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_body_bytes:
                error = _too_large(self.max_body_bytes, f"{int(declared)} bytes")
                await error_response(error, scope.get("path"))(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        # No length announced (chunked): read it all here, within the limit, then replay.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, replay([message], receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                error = _too_large(self.max_body_bytes, f"at least {size} bytes")
                await error_response(error, scope.get("path"))(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body_message: Message = {
            "type": "http.request",
            "body": b"".join(chunks),
            "more_body": False,
        }
        await self.app(scope, replay([body_message], receive), send)


def replay(messages: list[Message], receive: Receive) -> Receive:
    """A receive() that returns `messages` first, then defers to the real one (for a
    middleware that read the body before the app)."""
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed
