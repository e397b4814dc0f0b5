"""Past LAMINA_MAX_CONNECTIONS open connections, a new one is refused at once (a 503 with
`Connection: close`, before it sends anything), counted by reason, and the server serves
again as soon as connections close."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.attack.conftest import CAP
from tests.attack.raw_client import connection_metrics, read_to_eof
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]

NUM_EXTRA = 8
# Far below the server's header timeout (60 s): a refusal does not wait for anything.
REFUSED_WITHIN_S = 2.0
# Held connections are told apart from refused ones by getting nothing in this time.
HELD_QUIET_S = 3.0


async def connect_all(port: int, count: int) -> list[tuple[float, asyncio.StreamReader, object]]:
    """Open `count` connections one after the other (the server accepts them in order)."""
    opened = []
    for _ in range(count):
        start = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        opened.append((start, reader, writer))
    return opened


async def first_answer(start: float, reader: asyncio.StreamReader) -> tuple[float, bytes] | None:
    """What the server sends unprompted, and when; None when it stays quiet."""
    try:
        data = await asyncio.wait_for(read_to_eof(reader), HELD_QUIET_S)
    except asyncio.TimeoutError:
        return None
    return time.monotonic() - start, data


async def probe_cap(port: int) -> list[tuple[float, bytes] | None]:
    opened = await connect_all(port, CAP + NUM_EXTRA)
    answers = await asyncio.gather(*(first_answer(start, reader) for start, reader, _ in opened))
    for _, _, writer in opened:
        writer.close()  # type: ignore[attr-defined]
    return list(answers)


def wait_until_open_at_most(url: str, count: int, timeout_s: float = 20.0) -> int:
    """Poll /metrics until at most `count` connections are open (the scrape's own
    included). Returns how many scrapes were refused on the way (each counted)."""
    refused = 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if connection_metrics(url)["open"] <= count:
                return refused
        except (KeyError, httpx.HTTPError):
            refused += 1  # over the cap for an instant: a 503 without metrics
        time.sleep(0.1)
    raise AssertionError(f"connections did not close: {connection_metrics(url)}")


def test_connections_past_the_cap_are_refused_fast_and_counted(
    capped_server: ServerProcess,
) -> None:
    url = capped_server.url
    wait_until_open_at_most(url, 1)
    before = connection_metrics(url)

    answers = asyncio.run(probe_cap(capped_server.port))

    refused = [answer for answer in answers if answer is not None]
    held = [answer for answer in answers if answer is None]
    # One of ours may be refused in place of the last scrape, not yet seen closed.
    assert NUM_EXTRA <= len(refused) <= NUM_EXTRA + 1, answers
    assert len(held) == len(answers) - len(refused)
    for elapsed_s, data in refused:
        assert data.startswith(b"HTTP/1.1 503 "), data
        assert b"connection: close" in data and b"too_many_connections" in data, data
        assert elapsed_s < REFUSED_WITHIN_S, elapsed_s

    refused_scrapes = wait_until_open_at_most(url, 1)
    after = connection_metrics(url)
    over_limit = after["closed:over_limit"] - before["closed:over_limit"]
    assert over_limit == len(refused) + refused_scrapes, (over_limit, len(refused))
    assert httpx.get(url + "/health", timeout=10.0).status_code == 200
