"""Server-sent events framing and the streaming response that always closes its source.

Frames: `data: {json}\n\n` per event, `: keep-alive\n\n` comments on long silences,
`data: [DONE]\n\n` at the end of OpenAI streams. Headers stop proxies from buffering.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.api.errors import APIError

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"
SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: do not buffer this response
}


def sse_event(payload: BaseModel | dict[str, Any]) -> bytes:
    """One `data:` event carrying a JSON object."""
    if isinstance(payload, BaseModel):
        text = payload.model_dump_json()
    else:
        text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + text.encode("utf-8") + b"\n\n"


def sse_error(error: APIError, tgi: bool = False) -> bytes:
    """An error after the stream began: the status is already 200, so it goes in an event
    (with TGI's `error_type` on TGI routes)."""
    return sse_event(error.body(tgi))


class EventStreamResponse(StreamingResponse):
    """A text/event-stream response that closes its event iterator however it ends.

    Starlette stops iterating when the client disconnects but may leave the generator
    suspended, or never start it (a client gone before the first frame): closing it
    here runs its `finally`, and `on_close` runs even when the generator never started,
    so the request is aborted either way.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[bytes],
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(events, 200, headers=SSE_HEADERS)
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self._events, "aclose", None)
                if aclose is not None:
                    await aclose()
                if self._on_close is not None:
                    await self._on_close()
