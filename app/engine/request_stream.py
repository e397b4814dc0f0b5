"""The caller's side of a request: an async iterator of TokenDeltas fed by the engine thread."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from app.core import TokenDelta


class RequestStream:
    """Async iterator over the deltas of one request (all of its n choices, interleaved).

    Lives on the event loop. The engine thread never touches it directly: it schedules
    `push` on the loop with `call_soon_threadsafe`. Ends once every choice has delivered
    its final delta. Closing it early aborts the request in the engine.
    """

    def __init__(self, request_id: str, n: int, abort: Callable[[str], None]) -> None:
        self.request_id = request_id
        self._num_choices = n
        self._num_unfinished = n
        self._abort = abort
        self._queue: asyncio.Queue[TokenDelta] = asyncio.Queue()
        self._closed = False
        self._num_finals_pushed = 0

    @property
    def finished(self) -> bool:
        return self._num_unfinished == 0

    def push(self, delta: TokenDelta) -> bool:
        """Called on the event loop by the engine. True once every choice has ended."""
        if delta.finished:
            self._num_finals_pushed += 1
        if not self._closed:
            self._queue.put_nowait(delta)
        return self._num_finals_pushed >= self._num_choices

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenDelta:
        if self._num_unfinished == 0 or self._closed:
            raise StopAsyncIteration
        try:
            delta = await self._queue.get()
        except asyncio.CancelledError:
            # The task waiting on us was cancelled (client gone, deadline): stop the work.
            await self.aclose()
            raise
        if delta.finished:
            self._num_unfinished -= 1
        return delta

    def get_nowait(self) -> TokenDelta | None:
        """A delta already delivered, or None; lets SSE writers batch what is ready."""
        if self._queue.empty() or self._num_unfinished == 0:
            return None
        delta = self._queue.get_nowait()
        if delta.finished:
            self._num_unfinished -= 1
        return delta

    async def aclose(self) -> None:
        """Stop listening; aborts the request in the engine if it has not finished."""
        if self._closed:
            return
        self._closed = True
        if self._num_unfinished > 0:
            self._abort(self.request_id)
