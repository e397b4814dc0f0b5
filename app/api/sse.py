"""Server-sent events framing and the streaming response that always closes its source.

Frames: `data: {json}\n\n` per event, `: keep-alive\n\n` comments on long silences,
`data: [DONE]\n\n` at the end of OpenAI streams. Headers stop proxies from buffering.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.api.errors import APIError, server_error
from app.api.generation import Generation, engine_failure, is_failure
from app.api.request_record import report_failure
from app.core import TokenDelta

logger = logging.getLogger("lamina.api")

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


def sse_error(error: APIError, extra: dict[str, Any] | None = None) -> bytes:
    """An error after the stream began: the status is already 200, so it goes in an event."""
    body = error.body()
    if extra:
        body.update(extra)
    return sse_event(body)


class EventStreamResponse(StreamingResponse):
    """A text/event-stream response that closes its event iterator however it ends.

    Starlette stops iterating when the client disconnects but may leave the generator
    suspended; closing it here runs the route's `finally`, which aborts the request.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[bytes],
        status_code: int = 200,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(events, status_code, headers={**SSE_HEADERS, **(headers or {})})
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


async def pump_events(
    generation: Generation,
    keepalive_s: float,
    render: Callable[[int, TokenDelta], Iterable[bytes]],
    *,
    opening: Iterable[bytes] = (),
    closing: Callable[[], Iterable[bytes]] = lambda: (),
    error_extra: dict[str, Any] | None = None,
) -> AsyncIterator[bytes]:
    """The frames of one streamed answer; the route supplies how to render each delta.

    Every delta that is ready when the generation is read (one engine step's worth, or
    more when we fell behind) is rendered into one chunk, so the response makes one
    socket write per step instead of one per token; the last step's chunk also carries
    the closing frames. Silences longer than `keepalive_s` get a comment frame. A choice
    that fails in the engine, or a bug while rendering, ends the stream with an error
    event and [DONE]. The generation is always closed, so a client that leaves aborts
    its request.
    """
    try:
        frames = list(opening)
        if frames:
            yield b"".join(frames)
        while True:
            try:
                batch = await generation.next_batch(keepalive_s)
            except StopAsyncIteration:
                break
            if not batch:
                yield KEEPALIVE
                continue
            frames = []
            for choice_index, delta in batch:
                if is_failure(delta):
                    frames.append(sse_error(engine_failure(delta), error_extra))
                    frames.append(DONE)
                    yield b"".join(frames)
                    return
                frames.extend(render(choice_index, delta))
            if generation.finished:
                frames.extend(closing())
                closing = _nothing  # already written
            if frames:
                yield b"".join(frames)
        frames = list(closing())
        if frames:
            yield b"".join(frames)
    except Exception:
        logger.exception("stream %s failed", generation.request_id)
        report_failure("error")
        yield sse_error(server_error("internal server error while streaming"), error_extra)
        yield DONE
    finally:
        await generation.aclose()


def _nothing() -> Iterable[bytes]:
    return ()
