"""Reject JSON bodies that carry lone UTF-16 surrogates (`"\\ud800"` with no partner).

JSON may escape any code unit, so `"\\ud800"` is well-formed JSON, and Python's json
module turns it into a str holding a lone surrogate. That is not Unicode text: the
tokenizer, the chat template and the response encoder all fail on it (a 500). TGI's
own server (serde_json) refuses such bodies; lamina answers 400 before any route runs.

A raw surrogate cannot appear any other way (its UTF-8 form is invalid UTF-8, which the
JSON parser already refuses), so scanning the body's escape sequences is enough.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_response, invalid_request
from app.api.middleware import replay

# Every escape sequence, in order: `\uXXXX` (with its hex digits) or `\` + one character.
# Scanning them left to right handles `\\u...` (an escaped backslash) correctly.
_ESCAPE = re.compile(rb"\\(?:u([0-9a-fA-F]{4})|.)", re.DOTALL)
HIGH = range(0xD800, 0xDC00)
LOW = range(0xDC00, 0xE000)


def lone_surrogate_offset(body: bytes) -> int | None:
    """Byte offset of the first `\\uXXXX` escape that is half of a missing pair."""
    if b"\\u" not in body:
        return None
    pending_high: re.Match[bytes] | None = None
    for match in _ESCAPE.finditer(body):
        unit = int(match.group(1), 16) if match.group(1) else None
        if pending_high is not None:
            paired = unit in LOW and match.start() == pending_high.end()
            if not paired:
                return pending_high.start()
            pending_high = None
            continue
        if unit in HIGH:
            pending_high = match
        elif unit in LOW:
            return match.start()
    return None if pending_high is None else pending_high.start()


class UnicodeGuard:
    """400 for a request body with a lone surrogate escape; other requests pass as they are
    (the body is read here and replayed to the app)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        chunks: list[bytes] = []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        offset = lone_surrogate_offset(b"".join(chunks))
        if offset is not None:
            error = invalid_request(
                f"request body is not valid Unicode text: a lone UTF-16 surrogate escape at "
                f"byte {offset}; strings must be valid Unicode",
                code="invalid_unicode",
            )
            await error_response(error, scope.get("path"))(scope, receive, send)
            return
        await self.app(scope, replay(messages, receive), send)
