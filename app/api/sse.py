"""Server-sent events framing and the streaming response that always closes its source.

Frames: `data: {json}\n\n` per event, `: keep-alive\n\n` comments on long silences,
`data: [DONE]\n\n` at the end of OpenAI streams. Headers stop proxies from buffering.
`TextFrames` writes the frames of plain-text deltas from a template.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

# The C encoder behind json.dumps(ensure_ascii=False): escapes quotes, backslashes and
# control characters, and writes every other character as UTF-8, as pydantic does.
json_string: Callable[[str], str] = json.encoder.encode_basestring  # type: ignore[attr-defined]
# JSON has no -inf; a token the sampler masked out gets this instead (as vLLM does).
MIN_LOGPROB = -9999.0

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


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


class TextFrames:
    """The `data:` frames of one streamed answer's plain-text deltas, from templates.

    Building and dumping a pydantic chunk costs ~5 us per token; filling a template
    costs a fraction of that. A choice's template is its chunk model itself, dumped once
    with a marker where the text goes, so a frame is byte for byte the model's dump
    (tests/perf_http checks it) and cannot drift from it. Anything else (logprobs, a
    finish reason, usage) goes through the models.
    """

    MARK = "@@lamina-text@@"

    def __init__(self, chunk_of: Callable[[int, str], BaseModel]) -> None:
        self._chunk_of = chunk_of  # (choice index, text) -> the chunk of that text alone
        self._templates: dict[int, tuple[bytes, bytes] | None] = {}

    def frame(self, index: int, text: str) -> bytes:
        if index not in self._templates:
            self._templates[index] = self._template(index)
        template = self._templates[index]
        if template is None:
            return sse_event(self._chunk_of(index, text))
        return template[0] + json_string(text).encode("utf-8") + template[1]

    def _template(self, index: int) -> tuple[bytes, bytes] | None:
        """The frame's bytes before and after the text; None when an id or a model name
        holds the marker too (then every frame of the choice is a model's dump)."""
        parts = self._chunk_of(index, self.MARK).model_dump_json().split(json_string(self.MARK))
        if len(parts) != 2:
            return None
        return b"data: " + parts[0].encode("utf-8"), parts[1].encode("utf-8") + b"\n\n"


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
