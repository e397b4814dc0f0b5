"""Admission control (the bounded queue and its 429) and the run's deadline and stop.

Unit tests drive AdmissionController, its tickets and the driver's Run directly on an
event loop; the HTTP tests run the real app over the fake engine (in-process, no model).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from app.api.admission import AdmissionController
from app.api.deadline import Deadline, deadline_exceeded
from app.api.driver import Dialect, Run
from app.api.errors import APIError
from app.api.request_record import RequestRecord
from app.core import SamplingParams
from app.metrics import Metrics
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
    controller.watch_backlog(engine)
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


# --- runs: deadlines and stops ----------------------------------------------------------------


class Plain(Dialect):
    id_prefix = "plain"


def new_run(
    engine: FakeEngine,
    ticket,
    prompts: list[list[int]],
    n: int = 1,
    deadline: Deadline | None = None,
    runs: set | None = None,
    max_tokens: int = 500,
) -> Run:
    params = [SamplingParams(max_tokens=max_tokens)] * len(prompts)
    dialect = Plain("id", prompts, params, n, stream=False)
    record = RequestRecord("id", False, "POST", "/generate", Metrics("m"), False)
    return Run(engine, dialect, record, ticket, deadline, runs)


async def test_a_deadline_stops_the_run_and_counts_a_timeout(http_tokenizer) -> None:
    engine = FakeEngine(http_tokenizer, token_interval_s=10.0)  # nothing arrives in time
    engine.start()
    runs: set = set()
    run = new_run(engine, None, [[1, 2]], deadline=Deadline.after(0.05), runs=runs)
    assert runs == {run}  # where the drain finds it
    with pytest.raises(APIError) as stopped:
        await asyncio.wait_for(run.collect(), 2.0)
    assert stopped.value.code == "request_timeout"
    assert "deadline of 0.05 s" in stopped.value.message
    assert run.record.failure == "timeout" and engine.aborted == [run.streams[0].request_id]
    run.stop(deadline_exceeded(0.7))  # the first stop wins
    assert run.stopped_with is stopped.value
    await run.aclose()
    assert runs == set()


async def test_a_deadline_after_the_last_token_changes_nothing(http_tokenizer) -> None:
    engine = FakeEngine(http_tokenizer, token_interval_s=0.001)
    engine.start()
    run = new_run(engine, None, [[1, 2]], deadline=Deadline.after(0.1), max_tokens=2)
    await run.collect()
    await asyncio.sleep(0.2)  # only its final frames would still be being written
    assert run.stopped_with is None and run.record.failure is None and not engine.aborted
    await run.aclose()


async def test_stopping_a_run_aborts_every_engine_request_and_answers_with_the_error(
    http_tokenizer,
) -> None:
    engine = FakeEngine(http_tokenizer, token_interval_s=10.0)  # nothing arrives in time
    engine.start()
    controller = AdmissionController(max_queued=4, max_running=4, server_timeout_s=None)
    ticket = controller.admit()
    run = new_run(engine, ticket, [[1, 2], [3, 4]], n=2)
    reader = asyncio.ensure_future(run.collect())
    await asyncio.sleep(0.01)
    run.stop(deadline_exceeded(0.5))  # as the drain does with its own error
    with pytest.raises(APIError) as stopped:
        await asyncio.wait_for(reader, 1.0)
    assert stopped.value.status_code == 504 and stopped.value.code == "request_timeout"
    assert sorted(engine.aborted) == sorted(stream.request_id for stream in run.streams)
    assert len(engine.aborted) == 2
    assert run.finished and not ticket.started
    await run.aclose()
    assert run.record.finish_reasons == ["abort"] * 4
    controller.release(ticket)


async def test_the_first_delta_starts_the_ticket_and_closing_aborts_what_runs(
    http_tokenizer,
) -> None:
    engine = FakeEngine(http_tokenizer, token_interval_s=0.01)
    engine.start()
    controller = AdmissionController(max_queued=4, max_running=4, server_timeout_s=None)
    ticket = controller.admit()
    run = new_run(engine, ticket, [[1, 2]])
    assert await run.next_batch(None)
    assert ticket.started and controller.num_started == 1
    await run.aclose()  # the client left
    assert len(engine.aborted) == 1
    assert run.record.finish_reasons == ["cut_short"] and run.record.failure == "aborted"
    controller.release(ticket)
    assert controller.num_started == 0


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
