"""RequestStream.next_batch: everything delivered comes at once, with no task per delta."""

from __future__ import annotations

import asyncio

import pytest

from app.core import FinishReason, TokenDelta
from app.engine.request_stream import RequestStream, wait_for_delivery

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def delta(index: int, text: str, finished: bool = False) -> TokenDelta:
    reason = FinishReason.LENGTH if finished else None
    return TokenDelta("r", index, text, (1,), finish_reason=reason)


def new_stream(n: int = 1) -> tuple[RequestStream, list[str]]:
    aborted: list[str] = []
    return RequestStream("r", n, lambda request_id, _reason: aborted.append(request_id)), aborted


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


async def test_take_ready_and_iteration_still_work():
    stream, aborted = new_stream()
    assert stream.take_ready() == []
    stream.push(delta(0, "a"))
    assert [d.text for d in stream.take_ready()] == ["a"]
    stream.push(delta(0, "b"))
    stream.push(delta(0, "c", finished=True))
    assert [d.text async for d in stream] == ["b", "c"]
    await stream.aclose()
    assert aborted == []  # it had finished: nothing to abort


async def test_end_finishes_every_unfinished_choice_at_once_with_the_reason():
    stream, aborted = new_stream(n=3)
    stream.push(delta(0, "a"))
    stream.push(delta(1, "b", finished=True))
    stream.end("deadline passed")
    stream.push(delta(0, "late"))  # what the engine sent before it saw the abort: dropped
    batch = await stream.next_batch()
    assert [(d.index, d.text) for d in batch] == [(0, "a"), (1, "b"), (0, ""), (2, "")]
    assert [d.finish_reason for d in batch[2:]] == [FinishReason.ABORT] * 2
    assert {d.error for d in batch[2:]} == {"deadline passed"}
    assert stream.finished
    await stream.aclose()
    assert aborted == []  # ended already: the engine was told by whoever ended it


async def test_the_engine_forgets_a_stream_only_once_its_own_finals_arrived():
    stream, _ = new_stream(n=2)
    stream.end("gone")
    assert not stream.push(delta(0, "", finished=True))
    assert stream.push(delta(1, "", finished=True))


async def test_one_wait_serves_several_streams():
    first, _ = new_stream()
    second, _ = new_stream()
    waiter = asyncio.ensure_future(wait_for_delivery([first, second], None))
    await asyncio.sleep(0)
    assert not waiter.done()
    second.push(delta(0, "x"))
    await asyncio.wait_for(waiter, 1.0)
    assert first.take_ready() == [] and [d.text for d in second.take_ready()] == ["x"]
    assert first.waiter is None and second.waiter is None
    await asyncio.wait_for(wait_for_delivery([first, second], 0.01), 1.0)  # times out


async def test_a_cancelled_wait_closes_every_stream_it_waited_on():
    first, aborted_first = new_stream()
    second, aborted_second = new_stream()
    waiter = asyncio.ensure_future(wait_for_delivery([first, second], None))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert aborted_first == aborted_second == ["r"]
