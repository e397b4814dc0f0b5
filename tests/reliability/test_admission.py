"""Admission control (the bounded queue and its 429) and the run's deadline and stop.

Unit tests drive AdmissionController, its tickets and the driver's Run directly on an
event loop; the HTTP tests run the real app over the fake engine (in-process, no model).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from app.api.admission import CONTENTION_WINDOW_S, AdmissionController
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
    controller = AdmissionController(max_queued=2, max_running=3)
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
        num_running: int

    class BusyEngine:
        backlog = 0
        running = 0

        def stats(self) -> Stats:
            return Stats(self.backlog, self.running)

    controller = AdmissionController(max_queued=1, max_running=8)
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


async def test_sequences_waiting_only_for_a_slot_are_not_a_backlog() -> None:
    """A burst: the engine runs its first two requests (every slot) and holds the third
    before any first token reaches HTTP. The slots already count that wait, so the
    burst still gets max_running + max_queued places, however the timing falls."""

    @dataclass
    class Stats:
        num_waiting: int
        num_running: int

    class FullEngine:
        def stats(self) -> Stats:
            return Stats(num_waiting=1, num_running=2)

    controller = AdmissionController(max_queued=2, max_running=2)
    controller.watch_backlog(FullEngine())
    tickets = [controller.admit() for _ in range(4)]
    with pytest.raises(APIError):
        controller.admit()
    for ticket in tickets:
        controller.release(ticket)


async def test_wait_idle_returns_when_the_last_request_ends() -> None:
    controller = AdmissionController(max_queued=4, max_running=4)
    ticket = controller.admit()
    assert not await controller.wait_idle(0.01)
    asyncio.get_running_loop().call_later(0.05, controller.release, ticket)
    assert await controller.wait_idle(5.0)


# --- the weigh step: sequences and estimated tokens ------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def weighing_controller(share: float = 1.0, clock=None) -> AdmissionController:
    return AdmissionController(
        max_queued=8, max_running=8, max_sequences=10,
        max_tokens=1000, client_share=share, clock=clock or FakeClock(),
    )  # fmt: skip


def refusal(action) -> APIError:
    with pytest.raises(APIError) as refused:
        action()
    return refused.value


async def test_sequences_and_tokens_are_reserved_until_release() -> None:
    controller = weighing_controller()
    first = controller.admit("a")
    first.weigh(8, 400)
    assert (controller.num_seqs, controller.num_tokens) == (8, 400)
    second = controller.admit("a")
    error = refusal(lambda: second.weigh(3, 10))  # 8 + 3 sequences > 10
    assert (error.status_code, error.code, error.headers) == (
        429, "server_overloaded", {"Retry-After": "1"})  # fmt: skip
    assert "8 of 10 sequences are admitted and this request needs 3" in error.message
    error = refusal(lambda: second.weigh(2, 601))  # 400 + 601 tokens > 1000
    assert "400 of 1000 tokens (estimated) are admitted and this request needs 601" in (
        error.message
    )
    second.weigh(2, 600)  # exactly full
    assert controller.rejected == {"sequences": 1, "tokens": 1}
    controller.release(first)
    assert (controller.num_seqs, controller.num_tokens) == (2, 600)
    controller.release(second)
    controller.release(second)  # idempotent
    assert (controller.num_seqs, controller.num_tokens, controller.num_in_flight) == (0, 0, 0)
    assert controller.holding("a").empty


async def test_a_request_larger_than_a_whole_budget_is_a_413_naming_it() -> None:
    controller = weighing_controller()
    ticket = controller.admit("a")
    error = refusal(lambda: ticket.weigh(256, 10))
    assert (error.status_code, error.code) == (413, "request_too_large")
    assert "needs 256 sequences" in error.message
    assert "(10: LAMINA_MAX_NUM_SEQS + LAMINA_MAX_QUEUED_SEQUENCES)" in error.message
    error = refusal(lambda: ticket.weigh(1, 1001))
    assert "needs 1001 tokens" in error.message and "LAMINA_MAX_ADMITTED_TOKENS" in error.message
    assert controller.rejected == {"too_large": 2}
    controller.release(ticket)
    assert not controller.is_contended("b")  # a 413 is not a client waiting for its turn


async def test_one_client_takes_everything_alone_and_its_share_once_another_waits() -> None:
    clock = FakeClock()
    controller = weighing_controller(share=0.5, clock=clock)
    big = [controller.admit("a") for _ in range(2)]
    big[0].weigh(5, 500)
    big[1].weigh(5, 400)  # alone, client a may fill the sequence budget
    small = controller.admit("b")
    error = refusal(lambda: small.weigh(1, 10))  # no sequence left: b waits
    assert "10 of 10 sequences" in error.message
    controller.release(small)
    controller.release(big[0])  # a's request ends; a asks again at once
    again = controller.admit("a")
    error = refusal(lambda: again.weigh(5, 100))
    assert "this client holds 5 sequences and this request needs 5" in error.message
    assert "at most 5 of the 10 sequences" in error.message
    controller.release(again)
    retry = controller.admit("b")  # b's retry finds the room a had to leave
    retry.weigh(1, 10)
    assert controller.rejected == {"sequences": 1, "client_share": 1}
    for ticket in (big[1], retry):
        controller.release(ticket)

    # Refusals are forgotten after CONTENTION_WINDOW_S: alone again, a takes everything.
    clock.now += CONTENTION_WINDOW_S + 1
    alone = controller.admit("a")
    alone.weigh(10, 1000)
    controller.release(alone)


async def test_the_gate_holds_a_client_to_its_share_of_requests() -> None:
    controller = AdmissionController(max_queued=2, max_running=2,
                                     client_share=0.5, clock=FakeClock())  # fmt: skip
    held = [controller.admit("a") for _ in range(4)]  # alone: every place
    error = refusal(lambda: controller.admit("b"))
    assert error.status_code == 429 and "4 requests are already waiting" in error.message
    controller.release(held.pop())
    error = refusal(lambda: controller.admit("a"))  # b waits: a holds 3 of 4, share is 2
    assert "at most 2 of the 4 requests" in error.message
    held.append(controller.admit("b"))
    assert controller.rejected == {"requests": 1, "client_share": 1}
    for ticket in held:
        controller.release(ticket)


async def test_budgets_from_settings_and_the_kv_cache(default_model_path) -> None:
    settings = fake_settings(default_model_path, max_num_seqs=4)
    controller = AdmissionController.from_settings(settings)
    assert controller.max_sequences == 4 + 4 * 4 and controller.client_share == 0.5
    assert controller.max_tokens is None
    controller.size_token_budget(2048)  # unset: what the KV cache holds
    assert controller.max_tokens == 2048
    settings = fake_settings(
        default_model_path, max_queued_sequences=0, max_admitted_tokens=99, max_client_share=1
    )
    controller = AdmissionController.from_settings(settings)
    controller.size_token_budget(2048)  # set: kept
    assert (controller.max_sequences, controller.max_tokens) == (settings.max_num_seqs, 99)


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
    controller = AdmissionController(max_queued=4, max_running=4)
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
    controller = AdmissionController(max_queued=4, max_running=4)
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


async def test_the_weigh_step_refuses_before_the_engine_and_counts_by_reason(
    default_model_path, http_tokenizer
) -> None:
    engine = FakeEngine(http_tokenizer, token_interval_s=0.001)
    settings = fake_settings(default_model_path, max_num_seqs=4, max_queued=4)
    async with running_fake_app(settings, engine) as fake:
        huge = {"prompt": ["Hello"] * 32, "n": 8, "max_tokens": 2}  # 256 sequences
        response = await fake.client.post("/v1/completions", json=huge)
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert error["code"] == "request_too_large" and "needs 256 sequences" in error["message"]
        assert "(20: LAMINA_MAX_NUM_SEQS + LAMINA_MAX_QUEUED_SEQUENCES)" in error["message"]
        assert not engine.requests  # refused before anything reached the engine
        fits = {"prompt": ["Hello"] * 5, "n": 4, "max_tokens": 2}  # 20 sequences: the bound
        response = await fake.client.post("/v1/completions", json=fits)
        assert response.status_code == 200 and len(response.json()["choices"]) == 20
        assert fake.app.state.server.admission.num_seqs == 0  # released with the response
        metrics = (await fake.client.get("/metrics")).text
        assert 'lamina:admission_rejected_total{model_name="smollm2-135m-instruct",' \
            'reason="too_large"} 1.0' in metrics  # fmt: skip
        assert 'lamina:admitted_sequences{model_name="smollm2-135m-instruct"} 0.0' in metrics
