"""Priority under a saturated engine: a real `lamina serve` (tiny random model, two
running slots) gets a crowd of low-priority streams, then, once they queue, a crowd of
high-priority ones. The high ones' median time to first token is below the low ones'
in the same run, and every low-priority request still completes in full. Ordering is
asserted, never a duration."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server_process import SERVER_POOL, ServerProcess, engine_available, takes_servers

pytestmark = [pytest.mark.system, pytest.mark.slow]

NUM_EACH = 6
MAX_TOKENS = 96  # long enough that the first two are still running when the rest queue
SATURATED_ENV = {
    "LAMINA_DEVICE": "cpu",
    "LAMINA_NUM_THREADS": "1",
    "LAMINA_MAX_NUM_SEQS": "2",  # two running slots: the rest waits in the engine
    "LAMINA_KV_CACHE_GB": "0.01",
    # Admission lets the whole crowd in: the engine's queue is what is tested.
    "LAMINA_MAX_QUEUED_SEQUENCES": "32",
    "LAMINA_MAX_ADMITTED_TOKENS": "65536",
    "LAMINA_MAX_CLIENT_SHARE": "1",
    # No ageing within the test's few seconds: it would only blur the order tested.
    "LAMINA_PRIORITY_AGEING_S": "600",
}


def _planned_saturated_server(
    request: pytest.FixtureRequest, item: pytest.Item
) -> list[dict[str, str]]:
    if not engine_available():
        return []
    return [{**SATURATED_ENV, "LAMINA_MODEL": str(request.getfixturevalue("tiny_model_path"))}]


@pytest.fixture(scope="module")
@takes_servers(_planned_saturated_server)
def saturated_server(tiny_model_path: Path) -> Iterator[ServerProcess]:
    if not engine_available():
        pytest.skip("the engine is not in the tree")
    with SERVER_POOL.start({**SATURATED_ENV, "LAMINA_MODEL": str(tiny_model_path)}) as s:
        yield s


async def stream_one(
    client: httpx.AsyncClient, priority: int, index: int, started: asyncio.Event | None = None
) -> tuple[float, int]:
    """(seconds to the first token, tokens received) of one streamed completion; sets
    `started` at its first token."""
    body = {
        "prompt": f"Request {index} at priority {priority}:",
        "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0, "priority": priority,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    sent = time.monotonic()
    first_token_s, num_tokens = None, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            if first_token_s is None and '"text":"' in line and '"text":""' not in line:
                first_token_s = time.monotonic() - sent
                if started is not None:
                    started.set()
            if '"completion_tokens"' in line:
                num_tokens = httpx.Response(200, content=line[6:]).json()["usage"][
                    "completion_tokens"
                ]
    assert first_token_s is not None
    return first_token_s, num_tokens


async def crowd(url: str) -> tuple[list[tuple[float, int]], list[tuple[float, int]]]:
    """The low-priority crowd, then, once the engine runs two of them (the other four
    wait for a slot), the high-priority crowd."""
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        running = asyncio.Event()
        low = [asyncio.create_task(stream_one(client, 5, i, running)) for i in range(NUM_EACH)]
        await asyncio.wait_for(running.wait(), timeout=120)
        high = [asyncio.create_task(stream_one(client, 0, i)) for i in range(NUM_EACH)]
        return await asyncio.gather(*low), await asyncio.gather(*high)


def test_high_priority_is_served_first_and_low_priority_still_completes(
    saturated_server: ServerProcess,
) -> None:
    low, high = asyncio.run(crowd(saturated_server.url))
    assert [tokens for _, tokens in low] == [MAX_TOKENS] * NUM_EACH  # every one completes
    assert [tokens for _, tokens in high] == [MAX_TOKENS] * NUM_EACH
    low_p50 = statistics.median(ttft for ttft, _ in low)
    high_p50 = statistics.median(ttft for ttft, _ in high)
    assert high_p50 < low_p50, (low, high)
