"""The caller's side of a request: an async iterator of TokenDeltas fed by the engine thread."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as SequenceOf

from app.core import FinishReason, TokenDelta


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class RequestStream:
    """The deltas of one request (all of its n choices, interleaved), on the event loop.

    The engine thread never touches it directly: it schedules `push` on the loop with
    `call_soon_threadsafe`. The stream ends once every choice has delivered its final
    delta. `end(reason)` (what Engine.abort calls on the loop) ends every unfinished
    choice at once with an ABORT delta carrying `reason`; closing the stream early
    aborts the request in the engine.

    Deltas wait in a deque; a reader that finds it empty parks on one future, which the
    next `push` resolves. `take_ready` hands over everything delivered so far at once, so
    a streaming response writes the deltas of one engine step (or of several, when the
    reader fell behind) in one frame, with no task or queue future per delta.
    """

    def __init__(self, request_id: str, n: int, abort: Callable[[str, str], None]) -> None:
        self.request_id = request_id
        self._num_choices = n
        self._num_unfinished = n  # choices whose final delta the reader has not taken
        self._abort = abort
        self._ready: deque[TokenDelta] = deque()
        self._final_queued: set[int] = set()  # choices whose final delta is in _ready
        self.waiter: asyncio.Future[None] | None = None  # resolved by the next delivery
        self._closed = False  # the reader stopped listening
        self._ended = False  # end(): the reader sees nothing the engine sends later
        self._num_finals_pushed = 0

    @property
    def finished(self) -> bool:
        """Every choice's final delta has been taken (or the reader closed the stream)."""
        return self._num_unfinished == 0 or self._closed

    @property
    def delivered(self) -> bool:
        """Every choice's final delta has been taken: the reader saw the whole answer."""
        return self._num_unfinished == 0

    def push(self, delta: TokenDelta) -> bool:
        """Called on the event loop by the engine. True once every choice has ended."""
        if delta.finished:
            self._num_finals_pushed += 1
        if not (self._closed or self._ended):
            self._queue(delta)
        return self._num_finals_pushed >= self._num_choices

    def end(self, reason: str) -> None:
        """Finish every choice not yet finished with an ABORT delta carrying `reason`, now
        (the engine frees the request's blocks at its next step boundary)."""
        if self._closed or self._ended:
            return
        for index in range(self._num_choices):
            if index not in self._final_queued:
                self._queue(
                    TokenDelta(
                        self.request_id, index, "", (), finish_reason=FinishReason.ABORT,
                        error=reason,
                    )
                )  # fmt: skip
        self._ended = True

    def _queue(self, delta: TokenDelta) -> None:
        if delta.finished:
            self._final_queued.add(delta.index)
        self._ready.append(delta)
        if self.waiter is not None:
            _wake(self.waiter)

    def take_ready(self) -> list[TokenDelta]:
        """Every delta delivered and not yet taken, without waiting."""
        batch: list[TokenDelta] = []
        ready = self._ready
        while ready:
            delta = ready.popleft()
            if delta.finished:
                self._num_unfinished -= 1
            batch.append(delta)
        return batch

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenDelta:
        if self.finished:
            raise StopAsyncIteration
        if not self._ready:
            await wait_for_delivery([self], None)
            if not self._ready:  # closed while we waited
                raise StopAsyncIteration
        delta = self._ready.popleft()
        if delta.finished:
            self._num_unfinished -= 1
        return delta

    async def next_batch(self, timeout_s: float | None = None) -> list[TokenDelta]:
        """Every delta delivered so far (waiting for at least one); [] if `timeout_s`
        passed first. Raises StopAsyncIteration once every choice has ended."""
        if self.finished:
            raise StopAsyncIteration
        if not self._ready:
            await wait_for_delivery([self], timeout_s)
            if self._closed:
                raise StopAsyncIteration
        return self.take_ready()

    async def aclose(self) -> None:
        """Stop listening; aborts the request in the engine if it has not finished."""
        if self._closed:
            return
        unfinished = self._num_unfinished > 0 and not self._ended
        self._closed = True
        self._ready.clear()
        if self.waiter is not None:  # a reader parked on us ends instead of hanging
            _wake(self.waiter)
        if unfinished:
            self._abort(self.request_id, "the caller stopped reading")


async def wait_for_delivery(streams: SequenceOf[RequestStream], timeout_s: float | None) -> None:
    """Until one of `streams` receives a delta or is closed, or `timeout_s` passes.

    One future for all of them: a request with several prompts (one engine request
    each) waits for any of its streams without a task per stream. A cancelled wait
    (client gone, deadline) closes every stream, which aborts what is unfinished.
    """
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    for stream in streams:
        stream.waiter = waiter
    timer = None if timeout_s is None else loop.call_later(timeout_s, _wake, waiter)
    try:
        await waiter
    except asyncio.CancelledError:
        for stream in streams:
            await stream.aclose()
        raise
    finally:
        for stream in streams:
            stream.waiter = None
        if timer is not None:
            timer.cancel()
