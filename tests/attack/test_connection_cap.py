"""At LAMINA_MAX_CONNECTIONS open connections, a flood of idle connections cannot lock
the service out: each new connection takes the place of the one idle the longest, which
is closed at once, so /health still answers; every eviction is counted. (A refusal,
when every connection has a request in flight, is tested in test_protocol_guard.py.)"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.attack.conftest import CAP
from tests.attack.raw_client import connection_metrics, read_to_eof
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]

NUM_EXTRA = 5
# Far below the server's header timeout (60 s): an eviction does not wait for anything.
EVICTED_WITHIN_S = 2.0
# Connections still held are told apart from evicted ones by getting nothing in this time.
HELD_QUIET_S = 3.0


async def first_answer(start: float, reader: asyncio.StreamReader) -> tuple[float, bytes] | None:
    """What the server sends unprompted, and when; None when it stays quiet."""
    try:
        data = await asyncio.wait_for(read_to_eof(reader), HELD_QUIET_S)
    except asyncio.TimeoutError:
        return None
    return time.monotonic() - start, data


async def flood(url: str, port: int) -> tuple[list[tuple[float, bytes] | None], int]:
    """CAP idle connections, then GET /health, then NUM_EXTRA more idle connections
    (one after the other: the server accepts them in order). Returns what each idle
    connection got, oldest first, and /health's status."""
    opened = []

    async def connect() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        opened.append((time.monotonic(), reader, writer))

    for _ in range(CAP):
        await connect()
    async with httpx.AsyncClient(timeout=30.0) as client:
        health = (await client.get(url + "/health")).status_code
    for _ in range(NUM_EXTRA):
        await connect()
    answers = await asyncio.gather(*(first_answer(start, reader) for start, reader, _ in opened))
    for _, _, writer in opened:
        writer.close()
    return list(answers), health


def wait_until_open_at_most(url: str, count: int, timeout_s: float = 20.0) -> None:
    """Poll /metrics until at most `count` connections are open (the scrape's own
    included)."""
    deadline = time.monotonic() + timeout_s
    while connection_metrics(url)["open"] > count:
        assert time.monotonic() < deadline, connection_metrics(url)
        time.sleep(0.1)


def test_a_flood_of_idle_connections_at_the_cap_evicts_the_oldest(
    capped_server: ServerProcess,
) -> None:
    url = capped_server.url
    wait_until_open_at_most(url, 1)
    before = connection_metrics(url)

    answers, health = asyncio.run(flood(url, capped_server.port))

    assert health == 200
    evicted = [answer for answer in answers if answer is not None]
    # /health and each extra took one place; the last scrape's connection, if the server
    # had not yet seen it close, may have been evicted in place of one of ours.
    assert NUM_EXTRA <= len(evicted) <= NUM_EXTRA + 1, answers
    num_evicted = len(evicted)
    assert answers[:num_evicted] == evicted, "the oldest go first"
    for elapsed_s, data in evicted:
        assert data == b"", data  # closed silently: they had sent nothing
        assert elapsed_s < HELD_QUIET_S + EVICTED_WITHIN_S
    wait_until_open_at_most(url, 1)
    after = connection_metrics(url)
    assert after["closed:over_limit"] == before["closed:over_limit"]
    num_counted = after["closed:evicted"] - before["closed:evicted"]
    assert num_evicted <= num_counted <= NUM_EXTRA + 2, (num_counted, num_evicted)
