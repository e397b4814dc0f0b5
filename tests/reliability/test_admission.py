"""Admission control: the bounded queue, its 429, and the tickets behind deadlines.

Unit tests drive AdmissionController and TrackedStream directly on an event loop;
the HTTP tests run the real app over the fake engine (in-process, no model).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from app.api.admission import AdmissionController, ExpiredDelta, TrackedEngine, TrackedStream
from app.api.deadline import deadline_exceeded
from app.api.errors import APIError
from app.core import FinishReason, SamplingParams, TokenDelta
from tests.api.conftest import fake_settings, running_fake_app
from tests.api.fake_engine import FakeEngine

pytestmark = pytest.mark.anyio

COMPLETION = {"prompt": "Hello", "max_tokens": 4}


# --- the controller ------------------------------------------------------------------------


async def test_waiting_is_bounded_by_queue_plus_free_running_slots() -> None:
    controller = AdmissionController(max_queued=2, max_running=3, server_timeout_s=None)
    tickets = [controller.admit() for _ in range(5)]  # 3 may start at once, 2 may wait
    with pytest.raises(APIError) as refused:
        controller.admit()
    assert refused.value.status_code == 429
    assert refused.value.headers == {"Retry-After": "1"}
    assert refused.value.code == "server_overloaded"
    assert (controller.num_in_flight, controller.num_waiting) == (5, 5)

    # Two start running: they no longer wait, but took two of the free slots.
    tickets[0].mark_started()
    tickets[1].mark_started()
    assert controller.num_waiting == 3 and not controller.has_room()
    controller.release(tickets[0])  # a running request ends: one slot frees up
    assert controller.has_room()
    extra = controller.admit()
    assert controller.num_in_flight == 5 and controller.num_rejected == 1
    for ticket in [*tickets, extra]:
        controller.release(ticket)
        controller.release(ticket)  # idempotent
    assert (controller.num_in_flight, controller.num_started) == (0, 0)


async def test_an_engine_backlog_leaves_only_the_queue() -> None:
    @dataclass
    class Stats:
        num_waiting: int

    class BusyEngine:
        backlog = 0

        def stats(self) -> Stats:
            return Stats(self.backlog)

    controller = AdmissionController(max_queued=1, max_running=8, server_timeout_s=None)
    engine = BusyEngine()
    controller.track(engine)
    engine.backlog = 5  # e.g. a full KV cache: the engine cannot start what it has
    first = controller.admit()
    with pytest.raises(APIError):
        controller.admit()
    engine.backlog = 0
    second = controller.admit()
    controller.release(first)
    controller.release(second)


async def test_wait_idle_returns_when_the_last_request_ends() -> None:
    controller = AdmissionController(max_queued=4, max_running=4, server_timeout_s=None)
    ticket = controller.admit()
    assert not await controller.wait_idle(0.01)
    asyncio.get_running_loop().call_later(0.05, controller.release, ticket)
    assert await controller.wait_idle(5.0)


# --- streams and expiry ---------------------------------------------------------------------


class SlowStream:
    """An engine stream that yields one delta per `interval_s`; records closing."""

    def __init__(self, n: int = 1, num_tokens: int = 1000, interval_s: float = 0.01) -> None:
        self.n, self.num_tokens, self.interval_s = n, num_tokens, interval_s
        self.sent = 0
        self.closed = False

    def __aiter__(self) -> SlowStream:
        return self

    async def __anext__(self) -> TokenDelta:
        if self.closed or self.sent >= self.num_tokens * self.n:
            raise StopAsyncIteration
        await asyncio.sleep(self.interval_s)
        self.sent += 1
        return TokenDelta("r", self.sent % self.n, "x", (5,))

    async def aclose(self) -> None:
        self.closed = True


async def test_expiry_while_waiting_ends_every_choice_and_closes_the_engine_stream() -> None:
    controller = AdmissionController(max_queued=4, max_running=4, server_timeout_s=None)
    ticket = controller.admit()
    inner = SlowStream(n=2, interval_s=10.0)  # nothing arrives in time
    stream = TrackedStream(inner, ticket, "r", 2)
    reader = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0.01)
    ticket.expire(deadline_exceeded(0.5))
    first = await reader
    second = await stream.__anext__()
    assert isinstance(first, ExpiredDelta) and isinstance(second, ExpiredDelta)
    assert {first.index, second.index} == {0, 1}
    assert first.finish_reason is FinishReason.ABORT
    assert first.api_error is not None and first.api_error.status_code == 504
    assert inner.closed and not ticket.started
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()
    controller.release(ticket)


async def test_expiry_between_reads_frees_the_engine_at_once() -> None:
    controller = AdmissionController(max_queued=4, max_running=4, server_timeout_s=None)
    ticket = controller.admit()
    inner = SlowStream(interval_s=0.0)
    stream = TrackedStream(inner, ticket, "r", 1)
    assert (await stream.__anext__()).text == "x"
    assert ticket.started and controller.num_started == 1
    ticket.expire(deadline_exceeded(1.0))  # nobody is reading right now
    await asyncio.sleep(0)
    assert inner.closed  # aborted without waiting for the next read
    assert isinstance(await stream.__anext__(), ExpiredDelta)
    controller.release(ticket)
    assert controller.num_started == 0


async def test_someone_elses_cancel_is_not_swallowed() -> None:
    controller = AdmissionController(max_queued=4, max_running=4, server_timeout_s=None)
    ticket = controller.admit()
    stream = TrackedStream(SlowStream(interval_s=10.0), ticket, "r", 1)
    reader = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0.01)
    reader.cancel()  # e.g. Generation.aclose when the client leaves
    with pytest.raises(asyncio.CancelledError):
        await reader
    controller.release(ticket)


async def test_a_deadline_fires_on_its_own() -> None:
    controller = AdmissionController(max_queued=4, max_running=4, server_timeout_s=None)
    ticket = controller.admit(timeout_s=0.05)
    stream = TrackedStream(SlowStream(interval_s=10.0), ticket, "r", 1)
    delta = await asyncio.wait_for(stream.__anext__(), 5.0)
    assert isinstance(delta, ExpiredDelta) and "deadline of 0.05 s" in (delta.error or "")
    controller.release(ticket)


async def test_a_deadline_after_the_last_token_changes_nothing() -> None:
    class OneToken(SlowStream):
        async def __anext__(self) -> TokenDelta:
            if self.sent:
                raise StopAsyncIteration
            self.sent = 1
            return TokenDelta("r", 0, "x", (5,), finish_reason=FinishReason.LENGTH)

    controller = AdmissionController(max_queued=4, max_running=4, server_timeout_s=None)
    ticket = controller.admit(timeout_s=0.02)
    inner = OneToken()
    stream = TrackedStream(inner, ticket, "r", 1)
    assert (await stream.__anext__()).finish_reason is FinishReason.LENGTH
    await asyncio.sleep(0.1)  # the deadline passes while the response is being written
    assert ticket.expiry is None and not inner.closed
    controller.release(ticket)


async def test_tracked_engine_passes_through_outside_a_request(http_tokenizer) -> None:
    engine = FakeEngine(http_tokenizer)
    engine.start()
    tracked = TrackedEngine(engine)
    stream = tracked.generate("id-1", [1, 2], SamplingParams(max_tokens=2), n=1)
    assert not isinstance(stream, TrackedStream)  # no ticket in this context
    assert tracked.is_alive and tracked.max_model_len == engine.max_model_len
    await stream.aclose()


# --- through the app (fake engine) -------------------------------------------------------------


async def test_overload_answers_429_before_validation_and_tokenization(
    default_model_path, http_tokenizer
) -> None:
    engine = FakeEngine(http_tokenizer, token_interval_s=0.02)
    settings = fake_settings(default_model_path, max_queued=1, max_num_seqs=1)
    async with running_fake_app(settings, engine) as fake:
        client = fake.client
        body = {"prompt": "Hello", "max_tokens": 20, "ignore_eos": True}
        first = asyncio.ensure_future(client.post("/v1/completions", json=body))
        second = asyncio.ensure_future(client.post("/v1/completions", json=body))
        while len(engine.requests) < 2:
            await asyncio.sleep(0.005)
        num_engine_requests = len(engine.requests)
        for path, payload in (
            ("/v1/completions", body),
            ("/v1/completions", {"prompt": "x", "temperature": "not a number"}),
            ("/v1/chat/completions", {"messages": []}),
            ("/generate", {"inputs": "Hi"}),
            ("/generate_stream", {"inputs": "Hi"}),
        ):
            response = await client.post(path, json=payload)
            assert response.status_code == 429, (path, response.text)
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "server_overloaded"
            if path.startswith("/generate"):
                assert response.json()["error_type"] == "overloaded"  # TGI clients
        assert len(engine.requests) == num_engine_requests  # refused ones never reached it
        assert (await client.post("/tokenize", json={"prompt": "hi"})).status_code == 200
        assert [r.status_code for r in await asyncio.gather(first, second)] == [200, 200]
        assert (await client.post("/v1/completions", json=COMPLETION)).status_code == 200
        assert fake.app.state.server.admission.num_in_flight == 0


async def test_a_burst_never_admits_more_than_the_bound(default_model_path, http_tokenizer) -> None:
    engine = FakeEngine(http_tokenizer, token_interval_s=0.01)
    settings = fake_settings(default_model_path, max_queued=3, max_num_seqs=2)
    async with running_fake_app(settings, engine) as fake:
        controller = fake.app.state.server.admission
        peak = 0
        admit = controller.admit

        def admit_and_watch(*args, **kwargs):
            nonlocal peak
            ticket = admit(*args, **kwargs)
            peak = max(peak, controller.num_in_flight)
            return ticket

        controller.admit = admit_and_watch
        body = {"prompt": "Hello", "max_tokens": 6, "ignore_eos": True, "stream": True}
        responses = await asyncio.gather(
            *(fake.client.post("/v1/completions", json=body) for _ in range(60))
        )
        statuses = [r.status_code for r in responses]
        assert set(statuses) == {200, 429}, statuses
        assert peak <= 3 + 2
        for response in responses:
            if response.status_code == 200:
                assert response.text.rstrip().endswith("data: [DONE]")
        assert controller.num_in_flight == 0


async def test_a_request_that_leaves_gives_its_place_back(default_model_path, http_tokenizer):
    engine = FakeEngine(http_tokenizer, token_interval_s=0.05)
    settings = fake_settings(default_model_path, max_queued=0, max_num_seqs=1)
    async with running_fake_app(settings, engine) as fake:
        body = {"prompt": "Hello", "max_tokens": 100, "ignore_eos": True}
        leaving = asyncio.ensure_future(fake.client.post("/v1/completions", json=body))
        while not engine.requests:
            await asyncio.sleep(0.005)
        assert (await fake.client.post("/v1/completions", json=body)).status_code == 429
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert fake.app.state.server.admission.num_in_flight == 0
        ok = await fake.client.post("/v1/completions", json=COMPLETION)
        assert ok.status_code == 200


@pytest.mark.parametrize("header", ["abc", "0", "-1", "nan", "inf", "1e9", ""])
async def test_a_bad_timeout_header_is_a_400(fake_app, header: str) -> None:
    response = await fake_app.client.post(
        "/v1/completions", json=COMPLETION, headers={"X-Request-Timeout": header}
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "X-Request-Timeout"


async def test_admission_ignores_other_routes(fake_app) -> None:
    controller = fake_app.app.state.server.admission
    controller.max_queued = controller.max_running = 0  # nothing may be admitted
    assert (await fake_app.client.get("/v1/models")).status_code == 200
    assert (await fake_app.client.post("/tokenize", json={"prompt": "hi"})).status_code == 200
    assert (await fake_app.client.post("/v1/completions", json=COMPLETION)).status_code == 429
