"""The caller's side of a request: an async iterator of TokenDeltas fed by the engine thread."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from app.core import TokenDelta


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class RequestStream:
    """Async iterator over the deltas of one request (all of its n choices, interleaved).

    Lives on the event loop. The engine thread never touches it directly: it schedules
    `push` on the loop with `call_soon_threadsafe`. Ends once every choice has delivered
    its final delta. Closing it early aborts the request in the engine.

    Deltas wait in a deque; a reader that finds it empty parks on one future, which the
    next `push` resolves. `next_batch` hands over everything delivered so far at once, so
    a streaming response writes the deltas of one engine step (or of several, when the
    reader fell behind) in one frame, with no task or queue future per delta.
    """

    def __init__(self, request_id: str, n: int, abort: Callable[[str], None]) -> None:
        self.request_id = request_id
        self._num_choices = n
        self._num_unfinished = n
        self._abort = abort
        self._ready: deque[TokenDelta] = deque()
        self._waiter: asyncio.Future[None] | None = None
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
            self._ready.append(delta)
            if self._waiter is not None:
                _wake(self._waiter)
        return self._num_finals_pushed >= self._num_choices

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenDelta:
        if self._num_unfinished == 0 or self._closed:
            raise StopAsyncIteration
        if not self._ready:
            await self._wait(None)
            if not self._ready:  # closed while we waited
                raise StopAsyncIteration
        return self._take()

    async def next_batch(self, timeout_s: float | None = None) -> list[TokenDelta]:
        """Every delta delivered so far (waiting for at least one); [] if `timeout_s`
        passed first. Raises StopAsyncIteration once every choice has ended."""
        if self._num_unfinished == 0 or self._closed:
            raise StopAsyncIteration
        if not self._ready:
            await self._wait(timeout_s)
            if self._closed:
                raise StopAsyncIteration
        batch: list[TokenDelta] = []
        while self._ready and self._num_unfinished > 0:
            batch.append(self._take())
        return batch

    def get_nowait(self) -> TokenDelta | None:
        """A delta already delivered, or None."""
        if not self._ready or self._num_unfinished == 0:
            return None
        return self._take()

    def _take(self) -> TokenDelta:
        delta = self._ready.popleft()
        if delta.finished:
            self._num_unfinished -= 1
        return delta

    async def _wait(self, timeout_s: float | None) -> None:
        """Until a delta arrives (or `timeout_s` passes)."""
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = None if timeout_s is None else loop.call_later(timeout_s, _wake, waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            # The task waiting on us was cancelled (client gone, deadline): stop the work.
            await self.aclose()
            raise
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def aclose(self) -> None:
        """Stop listening; aborts the request in the engine if it has not finished."""
        if self._closed:
            return
        self._closed = True
        self._ready.clear()
        if self._waiter is not None:  # a reader parked on us ends instead of hanging
            _wake(self._waiter)
        if self._num_unfinished > 0:
            self._abort(self.request_id)
