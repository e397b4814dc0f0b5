"""Faults: one request's failure stays its own; a dead engine is reported, not hidden.

- A request whose prompt carries the fault-injection marker fails inside the engine
  step (real server process); the requests around it finish untouched.
- The engine thread is killed through the test-only route (real socket, real tiny
  engine, in-process so the hook setting can be switched on): /health turns 503 for the
  orchestrator, and every caller still waiting gets an error instead of hanging.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from app.config import Settings
from app.main import create_app
from tests.api.conftest import ThreadedServer
from tests.reliability.clients import Outcome, stream_body, stream_request
from tests.reliability.conftest import FAULT_MARKER, wait_until_idle


@pytest.mark.system
@pytest.mark.slow
def test_a_failing_request_fails_alone(shared_server) -> None:
    url = shared_server.url

    async def scenario() -> tuple[list[Outcome], list[httpx.Response], list[Outcome]]:
        async with httpx.AsyncClient(timeout=60.0) as client:
            healthy = [
                stream_request(client, url, route, stream_body(route, f"fine {i}", 24))
                for i, route in enumerate(["completions", "chat", "tgi"] * 3)
            ]
            faulty_streams = [
                stream_request(client, url, route, stream_body(route, f"{FAULT_MARKER} {i}", 24))
                for i, route in enumerate(["completions", "chat", "tgi"])
            ]
            faulty_plain = [
                client.post(url + "/v1/completions", json={"prompt": FAULT_MARKER}),
                client.post(url + "/generate", json={"inputs": f"x {FAULT_MARKER}"}),
            ]
            results = await asyncio.gather(*healthy, *faulty_streams, *faulty_plain)
            return results[:9], results[12:], results[9:12]

    healthy, faulty_plain, faulty_streams = asyncio.run(scenario())
    assert all(o.complete for o in healthy), [o for o in healthy if not o.complete]
    for outcome in faulty_streams:
        assert outcome.status == 200 and outcome.error is not None, outcome
        assert outcome.error["code"] == "generation_error"
        assert "injected fault" in outcome.error["message"]
    for response in faulty_plain:
        assert response.status_code == 500, response.text
        assert response.json()["error"]["code"] == "generation_error"
    assert httpx.get(url + "/health").status_code == 200
    wait_until_idle(url)


@pytest.fixture
def crashable_server(tiny_model_path) -> Iterator[str]:
    settings = Settings(
        enable_test_hooks=True,
        model=tiny_model_path,
        kv_cache_gb=0.02,
        max_model_len=1024,
        max_num_seqs=2,
    )
    with ThreadedServer(create_app(settings)) as server:
        yield server.url


def test_a_dead_engine_fails_every_waiter_and_health_says_so(crashable_server: str) -> None:
    url = crashable_server

    async def scenario() -> tuple[list[Outcome], list[httpx.Response]]:
        async with httpx.AsyncClient(timeout=30.0) as client:
            firsts = [asyncio.Event(), asyncio.Event()]
            streams = [  # the two running sequences (max_num_seqs=2)
                asyncio.create_task(
                    stream_request(
                        client, url, route, stream_body(route, "long", 900), first_event=first
                    )
                )
                for route, first in zip(["completions", "tgi"], firsts)
            ]
            await asyncio.gather(*(first.wait() for first in firsts))
            queued = [  # waiting behind them in the engine
                asyncio.create_task(
                    client.post(
                        url + "/v1/completions",
                        json={"prompt": f"queued {i}", "max_tokens": 900, "ignore_eos": True},
                    )
                )
                for i in range(3)
            ]
            await asyncio.sleep(0.2)
            crash = await client.post(url + "/debug/engine/crash")
            assert crash.status_code == 200, crash.text
            outcomes = await asyncio.wait_for(asyncio.gather(*streams), 20)
            plain = await asyncio.wait_for(asyncio.gather(*queued), 20)
            return list(outcomes), list(plain)

    outcomes, plain = asyncio.run(scenario())
    for outcome in outcomes:
        assert outcome.status == 200 and outcome.error is not None, outcome
        assert "engine" in outcome.error["message"]
    for response in plain:
        assert response.status_code in (500, 503), response.text
        assert "engine" in response.json()["error"]["message"]
    health = httpx.get(url + "/health")
    assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
    assert httpx.get(url + "/ready").status_code == 503
    late = httpx.post(url + "/v1/completions", json={"prompt": "late", "max_tokens": 2})
    assert late.status_code == 503 and late.json()["error"]["code"] == "engine_dead"


@pytest.mark.anyio
async def test_the_crash_route_exists_only_with_test_hooks(fake_app) -> None:
    response = await fake_app.client.post("/debug/engine/crash")
    assert response.status_code == 404
    assert fake_app.engine.is_alive
