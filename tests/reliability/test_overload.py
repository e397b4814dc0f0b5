"""Overload on a real server process: a small queue, a burst, and nothing lost.

With LAMINA_MAX_NUM_SEQS=2 and LAMINA_MAX_QUEUED=2, a burst of 30 streams cannot all
be taken: the refused ones get 429 with Retry-After in the error envelope at once, and
every accepted one still completes with its full token count. The refusals show in
/metrics as `overloaded` failures, and SIGTERM on the idle server exits 0 at once.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.reliability.clients import ROUTES, Outcome, stream_body, stream_request
from tests.reliability.conftest import failure_counts, wait_until_idle

pytestmark = [pytest.mark.system, pytest.mark.slow]

BURST = 30
MAX_TOKENS = 48


@pytest.mark.server_env(LAMINA_MAX_NUM_SEQS="2", LAMINA_MAX_QUEUED="2")
def test_a_burst_beyond_the_queue_gets_429s_and_loses_nothing(start_server):
    server = start_server()

    async def burst() -> list[Outcome]:
        limits = httpx.Limits(max_connections=BURST)
        async with httpx.AsyncClient(timeout=60.0, limits=limits) as client:
            return await asyncio.gather(
                *(
                    stream_request(
                        client,
                        server.url,
                        ROUTES[i % len(ROUTES)],
                        stream_body(ROUTES[i % len(ROUTES)], f"burst {i}", MAX_TOKENS),
                    )
                    for i in range(BURST)
                )
            )

    outcomes = asyncio.run(burst())
    refused = [o for o in outcomes if o.status == 429]
    accepted = [o for o in outcomes if o.status != 429]
    assert refused and len(accepted) >= 4, [o.status for o in outcomes]
    print(f"overload: {len(accepted)} accepted, {len(refused)} refused")
    for outcome in refused:
        assert outcome.retry_after == "1"
        assert outcome.error is not None and outcome.error["code"] == "server_overloaded"
    incomplete = [o for o in accepted if not o.complete]
    assert not incomplete, incomplete[:2]

    wait_until_idle(server.url)
    assert failure_counts(server.url)["overloaded"] == len(refused)
    after = httpx.post(
        server.url + "/v1/completions", json={"prompt": "after", "max_tokens": 3}, timeout=30
    )
    assert after.status_code == 200  # the queue drained: the next request is taken

    started = time.monotonic()
    assert server.stop() == 0, server.log_tail()  # idle: SIGTERM exits 0 at once
    assert time.monotonic() - started < 5
