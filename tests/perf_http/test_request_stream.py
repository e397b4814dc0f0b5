"""RequestStream.next_batch: everything delivered comes at once, with no task per delta."""

from __future__ import annotations

import asyncio

import pytest

from app.core import FinishReason, TokenDelta
from app.engine.request_stream import RequestStream

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def delta(index: int, text: str, finished: bool = False) -> TokenDelta:
    reason = FinishReason.LENGTH if finished else None
    return TokenDelta("r", index, text, (1,), finish_reason=reason)


def new_stream(n: int = 1) -> tuple[RequestStream, list[str]]:
    aborted: list[str] = []
    return RequestStream("r", n, aborted.append), aborted


async def test_next_batch_returns_everything_pushed_since_the_last_read():
    stream, _ = new_stream(n=2)
    for text in "abc":
        stream.push(delta(0, text))
    stream.push(delta(1, "x"))
    assert [d.text for d in await stream.next_batch()] == ["a", "b", "c", "x"]
    stream.push(delta(0, "d", finished=True))
    assert [d.text for d in await stream.next_batch()] == ["d"]
    stream.push(delta(1, "y", finished=True))
    assert [d.text for d in await stream.next_batch()] == ["y"]
    with pytest.raises(StopAsyncIteration):
        await stream.next_batch()


async def test_a_parked_reader_wakes_on_push_and_gets_the_whole_step():
    stream, _ = new_stream()
    reader = asyncio.ensure_future(stream.next_batch())
    await asyncio.sleep(0)
    assert not reader.done()
    loop = asyncio.get_running_loop()
    # What Engine._push_all does for one step: several pushes in one loop callback.
    loop.call_soon(lambda: [stream.push(delta(0, t)) for t in "pq"])
    assert [d.text for d in await reader] == ["p", "q"]


async def test_timeout_returns_an_empty_batch_without_aborting():
    stream, aborted = new_stream()
    assert await stream.next_batch(timeout_s=0.01) == []
    assert aborted == []
    stream.push(delta(0, "late", finished=True))
    assert [d.text for d in await stream.next_batch(timeout_s=0.01)] == ["late"]
    assert stream.finished


async def test_cancelling_the_reader_aborts_the_request():
    stream, aborted = new_stream()
    reader = asyncio.ensure_future(stream.next_batch())
    await asyncio.sleep(0)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert aborted == ["r"]


async def test_closing_wakes_a_parked_reader_which_then_stops():
    stream, aborted = new_stream()
    reader = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0)
    await stream.aclose()
    with pytest.raises(StopAsyncIteration):
        await reader
    assert aborted == ["r"]


async def test_iteration_and_get_nowait_still_work():
    stream, aborted = new_stream()
    assert stream.get_nowait() is None
    stream.push(delta(0, "a"))
    stream.push(delta(0, "b", finished=True))
    assert stream.get_nowait().text == "a"
    assert [d.text async for d in stream] == ["b"]
    await stream.aclose()
    assert aborted == []  # it had finished: nothing to abort
