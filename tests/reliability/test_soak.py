"""Soak: 400 streaming requests at concurrency 64 against a real server process, with
10% of the clients leaving at random points (seeded).

Every client that stayed must get its full token count; nobody may see a 5xx; and
afterwards the engine must be idle with every KV block free (read back from /metrics),
so a client that leaves costs nothing once it is gone.
"""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from tests.reliability.clients import ROUTES, Outcome, stream_body, stream_request
from tests.reliability.conftest import wait_until_idle

pytestmark = [pytest.mark.system, pytest.mark.slow]

NUM_REQUESTS = 400
CONCURRENCY = 64
LEAVE_FRACTION = 0.10
SEED = 20240604


def plan(seed: int) -> list[tuple[str, dict, int | None]]:
    """(route, body, leave after N events or None) for every request; seeded."""
    rng = random.Random(seed)
    leaving = set(rng.sample(range(NUM_REQUESTS), int(NUM_REQUESTS * LEAVE_FRACTION)))
    requests = []
    for index in range(NUM_REQUESTS):
        route = ROUTES[index % len(ROUTES)]
        max_tokens = rng.randint(8, 16)
        temperature = rng.choice([0.0, 0.7, 1.0])
        body = stream_body(route, f"Request {index}: tell me a story", max_tokens, temperature)
        leave = rng.randint(0, max_tokens - 1) if index in leaving else None
        requests.append((route, body, leave))
    return requests


async def run_soak(url: str) -> list[Outcome]:
    gate = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(timeout=120.0, limits=limits) as client:

        async def one(route: str, body: dict, leave: int | None) -> Outcome:
            async with gate:
                return await stream_request(client, url, route, body, leave)

        return await asyncio.gather(*(one(*request) for request in plan(SEED)))


def test_soak_with_disconnects_loses_nothing_and_leaks_nothing(shared_server):
    started = time.monotonic()
    outcomes = asyncio.run(run_soak(shared_server.url))
    elapsed_s = time.monotonic() - started

    server_errors = [o for o in outcomes if o.status >= 500 or (o.error and not o.left_early)]
    assert not server_errors, f"{len(server_errors)} failed, e.g. {server_errors[:2]}"
    stayed = [o for o in outcomes if not o.left_early]
    left = [o for o in outcomes if o.left_early]
    assert len(left) == int(NUM_REQUESTS * LEAVE_FRACTION)
    incomplete = [o for o in stayed if not o.complete]
    assert not incomplete, f"{len(incomplete)} of {len(stayed)} incomplete: {incomplete[:2]}"
    assert {o.route for o in stayed} == set(ROUTES)

    # Nothing left behind: no sequence running or waiting, every KV block free.
    wait_until_idle(shared_server.url)
    print(f"soak: {NUM_REQUESTS} streams, {len(left)} left early, {elapsed_s:.1f} s")
