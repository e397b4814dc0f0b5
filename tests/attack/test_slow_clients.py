"""Idle, slowloris, slow-body and idle keep-alive connections against a real server with
small limits (conftest.LIMITS): each is closed within its configured time, while /health
and a chat request keep succeeding, and every closure is counted by reason."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.attack.raw_client import (
    Closed,
    connection_metrics,
    idle_after_request,
    open_idle,
    slow_body,
    slowloris,
)
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 2.0
IDLE_TIMEOUT_S = 2.0
# A loaded 2-core machine may run the server's timers and the client's reads late.
MARGIN_S = 2.5
NUM_IDLE = 15
NUM_SLOWLORIS = 15
NUM_SLOW_BODY = 5
NUM_KEEPALIVE = 5
CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


async def probe_service(url: str, stop: asyncio.Event) -> list[int]:
    """GET /health and a chat request, over and over, until `stop`: their statuses."""
    statuses: list[int] = []
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        while not stop.is_set():
            statuses.append((await client.get("/health")).status_code)
            statuses.append((await client.post("/v1/chat/completions", json=CHAT)).status_code)
            await asyncio.sleep(0.1)
    return statuses


async def attack(port: int, url: str) -> tuple[dict[str, list[Closed]], list[int]]:
    stop = asyncio.Event()
    service = asyncio.ensure_future(probe_service(url, stop))
    groups = {
        "idle": [open_idle(port) for _ in range(NUM_IDLE)],
        "slowloris": [slowloris(port, 0.2) for _ in range(NUM_SLOWLORIS)],
        "slow_body": [slow_body(port, 0.2) for _ in range(NUM_SLOW_BODY)],
        "keepalive": [idle_after_request(port) for _ in range(NUM_KEEPALIVE)],
    }
    names = list(groups)
    results = await asyncio.gather(*(asyncio.gather(*groups[name]) for name in names))
    stop.set()
    return dict(zip(names, results)), await service


def assert_closed_within(closed: list[Closed], timeout_s: float, what: str) -> None:
    times = sorted(round(c.elapsed_s, 2) for c in closed)
    assert all(timeout_s - 0.05 <= t <= timeout_s + MARGIN_S for t in times), (what, times)


def test_slow_and_idle_connections_are_closed_while_the_service_answers(
    guarded_server: ServerProcess,
) -> None:
    before = connection_metrics(guarded_server.url)
    start = time.monotonic()
    closed, statuses = asyncio.run(attack(guarded_server.port, guarded_server.url))
    wall_s = time.monotonic() - start

    assert_closed_within(closed["idle"], HEADER_TIMEOUT_S, "idle")
    assert all(c.data == b"" for c in closed["idle"])  # nothing sent: closed silently
    assert_closed_within(closed["slowloris"], HEADER_TIMEOUT_S, "slowloris")
    assert {c.status for c in closed["slowloris"]} <= {408, None}  # None: reset by drip
    assert_closed_within(closed["slow_body"], BODY_TIMEOUT_S, "slow body")
    assert {c.status for c in closed["slow_body"]} <= {408, None}
    assert_closed_within(closed["keepalive"], IDLE_TIMEOUT_S, "keep-alive")
    assert all(c.status == 200 for c in closed["keepalive"])  # answered, then idle

    assert wall_s < max(HEADER_TIMEOUT_S, BODY_TIMEOUT_S, IDLE_TIMEOUT_S) + 2 * MARGIN_S
    assert len(statuses) >= 4 and set(statuses) == {200}, statuses

    after = connection_metrics(guarded_server.url)
    delta = {key: after[key] - before.get(key, 0.0) for key in after if key != "open"}
    assert delta["closed:header_timeout"] >= NUM_IDLE + NUM_SLOWLORIS, delta
    assert delta["closed:body_timeout"] >= NUM_SLOW_BODY, delta
    assert delta["closed:idle_timeout"] >= NUM_KEEPALIVE, delta
    assert delta["closed:over_limit"] == 0, delta
    # Every connection closes: only the scrape's own is left (polled: the probe's
    # client may close its connection just before).
    deadline = time.monotonic() + 10.0
    while connection_metrics(guarded_server.url)["open"] > 1:
        assert time.monotonic() < deadline, connection_metrics(guarded_server.url)
        time.sleep(0.1)
