"""BodyGuard, the ASGI middleware that reads request bodies before the app does (pure
ASGI: streaming and disconnects pass through).

- 413 for a body over Settings.max_body_bytes, from the Content-Length header when
  there is one, otherwise while reading a chunked body;
- 415 for a POST/PUT/PATCH with a `Content-Encoding` (bodies are not decompressed), or
  with a body not labelled `Content-Type: application/json`;
- 400 for such a body that is not UTF-8, holds a lone UTF-16 surrogate escape
  (unicode_guard.py), or nests JSON deeper than the parser can follow: each with its
  own code, where the JSON parser would give one generic message.

A body it read is replayed to the app. Request ids, access logs and HTTP metrics:
ObservabilityMiddleware (observability.py).
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import APIError, error_response, invalid_request, request_too_large
from app.api.unicode_guard import lone_surrogate_offset

BODY_METHODS = ("POST", "PUT", "PATCH")  # bodies the routes parse as JSON
# Brackets below which no JSON can reach the parser's recursion limit (about 1,000).
_DEPTH_CHECK_BRACKETS = 900


def _unsupported_media(message: str, code: str) -> APIError:
    return APIError(415, message, type="invalid_request_error", code=code)


def _header_refusal(headers: dict[bytes, bytes]) -> APIError | None:
    """A body lamina will not read as JSON, told from its headers alone."""
    encoding = headers.get(b"content-encoding", b"").strip().lower()
    if encoding not in (b"", b"identity"):
        return _unsupported_media(
            f"Content-Encoding {encoding.decode('latin-1')!r} is not supported: send the "
            "body uncompressed",
            "unsupported_content_encoding",
        )
    return None


def _content_type_refusal(headers: dict[bytes, bytes]) -> APIError | None:
    raw = headers.get(b"content-type")
    media_type = (raw or b"").split(b";")[0].strip().lower()
    if media_type == b"application/json":
        return None
    got = f"got {raw.decode('latin-1')!r}" if raw else "got none"
    return _unsupported_media(
        f"request body must be JSON, sent with Content-Type: application/json ({got})",
        "unsupported_media_type",
    )


def _body_refusal(body: bytes) -> APIError | None:
    """400 for a JSON body the parser would fail on without saying why."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return invalid_request(
            f"request body is not valid UTF-8: byte 0x{body[exc.start]:02x} at offset {exc.start}",
            code="invalid_utf8",
        )
    offset = lone_surrogate_offset(body)
    if offset is not None:
        return invalid_request(
            f"request body is not valid Unicode text: a lone UTF-16 surrogate escape at "
            f"byte {offset}; strings must be valid Unicode",
            code="invalid_unicode",
        )
    if body.count(b"[") + body.count(b"{") >= _DEPTH_CHECK_BRACKETS:
        try:
            json.loads(body)
        except RecursionError:
            return invalid_request(
                "request body nests JSON too deeply (about 1,000 levels or more)",
                code="json_too_deep",
            )
        except ValueError:
            return None  # malformed: the route's parser says where
    return None


def _too_large(limit_bytes: int, got: str) -> APIError:
    return request_too_large(f"request body is {got}; at most {limit_bytes} bytes are allowed")


class BodyGuard:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(_too_large(limit, f"{int(declared)} bytes"), scope, receive, send)
            return
        scanned = scope["method"] in BODY_METHODS
        refusal = _header_refusal(headers) if scanned else None
        if refusal is not None:
            await self._refuse(refusal, scope, receive, send)
            return
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
            refusal = (_content_type_refusal(headers) or _body_refusal(body)) if body else None
            if refusal is not None:
                await self._refuse(refusal, scope, receive, send)
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
