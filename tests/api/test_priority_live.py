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

from tests.server_process import ServerProcess, engine_available

pytestmark = [pytest.mark.system, pytest.mark.slow]

NUM_EACH = 6
MAX_TOKENS = 48
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


@pytest.fixture(scope="module")
def saturated_server(tiny_model_path: Path) -> Iterator[ServerProcess]:
    if not engine_available():
        pytest.skip("the engine is not in the tree")
    with ServerProcess(extra_env={**SATURATED_ENV, "LAMINA_MODEL": str(tiny_model_path)}) as s:
        yield s


async def stream_one(client: httpx.AsyncClient, priority: int, index: int) -> tuple[float, int]:
    """(seconds to the first token, tokens received) of one streamed completion."""
    body = {
        "prompt": f"Request {index} at priority {priority}:",
        "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0, "priority": priority,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    started = time.monotonic()
    first_token_s, num_tokens = None, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            if first_token_s is None and '"text":"' in line and '"text":""' not in line:
                first_token_s = time.monotonic() - started
            if '"completion_tokens"' in line:
                num_tokens = httpx.Response(200, content=line[6:]).json()["usage"][
                    "completion_tokens"
                ]
    assert first_token_s is not None
    return first_token_s, num_tokens


async def crowd(url: str) -> tuple[list[tuple[float, int]], list[tuple[float, int]]]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        low = [asyncio.create_task(stream_one(client, 5, i)) for i in range(NUM_EACH)]
        await wait_until_queued(client)
        high = [asyncio.create_task(stream_one(client, 0, i)) for i in range(NUM_EACH)]
        return await asyncio.gather(*low), await asyncio.gather(*high)


async def wait_until_queued(client: httpx.AsyncClient) -> None:
    """Until the engine runs two low-priority sequences and holds the rest waiting."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        metrics = (await client.get("/metrics")).text
        if "lamina:num_requests_waiting" in metrics and _gauge(metrics, "waiting") >= 2:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the low-priority requests never queued")


def _gauge(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(f"lamina:num_requests_{name}"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_high_priority_is_served_first_and_low_priority_still_completes(
    saturated_server: ServerProcess,
) -> None:
    low, high = asyncio.run(crowd(saturated_server.url))
    assert [tokens for _, tokens in low] == [MAX_TOKENS] * NUM_EACH  # every one completes
    assert [tokens for _, tokens in high] == [MAX_TOKENS] * NUM_EACH
    low_p50 = statistics.median(ttft for ttft, _ in low)
    high_p50 = statistics.median(ttft for ttft, _ in high)
    assert high_p50 < low_p50, (low, high)
