"""SIGTERM on a real server process: drain, drain timeout, and a second signal."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time

import httpx
import pytest

from tests.reliability.clients import Outcome, stream_body, stream_request

pytestmark = [pytest.mark.system, pytest.mark.slow]

NUM_STREAMS = 16


async def start_streams(
    client: httpx.AsyncClient, url: str, num_streams: int, max_tokens: int
) -> list[asyncio.Task[Outcome]]:
    """Start streaming requests and return once each has received its first event."""
    firsts = [asyncio.Event() for _ in range(num_streams)]
    routes = ["completions", "chat"]
    tasks = [
        asyncio.create_task(
            stream_request(
                client,
                url,
                routes[i % 2],
                stream_body(routes[i % 2], f"Drain test {i}", max_tokens),
                first_event=first,
            )
        )
        for i, first in enumerate(firsts)
    ]
    await asyncio.wait_for(asyncio.gather(*(first.wait() for first in firsts)), 60)
    return tasks


def exit_code(process: subprocess.Popen, timeout_s: float) -> int:
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"the server did not exit within {timeout_s} s")


@pytest.mark.server_env(LAMINA_DRAIN_TIMEOUT_S="60")
def test_sigterm_lets_every_stream_finish_then_exits_zero(start_server):
    server = start_server()
    max_tokens = 600  # about two seconds of decoding for 16 streams on one thread

    async def scenario() -> tuple[list[Outcome], dict[str, object]]:
        limits = httpx.Limits(max_connections=NUM_STREAMS + 4)
        async with httpx.AsyncClient(timeout=60.0, limits=limits) as client:
            tasks = await start_streams(client, server.url, NUM_STREAMS, max_tokens)
            assert not any(task.done() for task in tasks), "streams ended before SIGTERM"
            server.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            seen: dict[str, object] = {"ready": (await client.get(server.url + "/ready"))}
            seen["new"] = await client.post(
                server.url + "/v1/completions", json={"prompt": "late", "max_tokens": 2}
            )
            seen["streams_running"] = sum(not task.done() for task in tasks)
            return list(await asyncio.gather(*tasks)), seen

    outcomes, seen = asyncio.run(scenario())
    assert seen["streams_running"] > 0, "the checks ran after the drain, proving nothing"
    ready, new = seen["ready"], seen["new"]
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "server_draining"
    assert new.status_code == 503 and new.json()["error"]["code"] == "server_draining"
    incomplete = [o for o in outcomes if not o.complete]
    assert not incomplete, f"{len(incomplete)} streams lost in the drain: {incomplete[:2]}"
    assert exit_code(server.process, 30) == 0, server.log_tail()
    assert "drained: no request in flight" in server.log_tail(200)


@pytest.mark.server_env(LAMINA_DRAIN_TIMEOUT_S="0.5")
def test_drain_timeout_stops_what_is_left_with_a_clear_error(start_server):
    server = start_server()
    long_tokens = 900  # seconds of decoding: cannot finish within the drain timeout

    async def scenario() -> tuple[list[Outcome], httpx.Response, float]:
        async with httpx.AsyncClient(timeout=60.0) as client:
            tasks = await start_streams(client, server.url, 3, long_tokens)
            plain = asyncio.create_task(
                client.post(
                    server.url + "/v1/completions",
                    json={"prompt": "plain", "max_tokens": long_tokens, "ignore_eos": True},
                )
            )
            await asyncio.sleep(0.1)
            started = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            outcomes = list(await asyncio.gather(*tasks))
            return outcomes, await plain, time.monotonic() - started

    outcomes, plain, elapsed_s = asyncio.run(scenario())
    assert elapsed_s < 10
    for outcome in outcomes:
        assert outcome.status == 200 and outcome.done and not outcome.complete
        assert outcome.error is not None and outcome.error["code"] == "request_aborted"
        assert "drain timeout" in outcome.error["message"]
    assert plain.status_code == 503, plain.text
    assert plain.json()["error"]["code"] == "request_aborted"
    assert exit_code(server.process, 30) == 0, server.log_tail()


@pytest.mark.server_env(LAMINA_DRAIN_TIMEOUT_S="60")
def test_a_second_sigterm_stops_at_once(start_server):
    server = start_server()

    async def scenario() -> tuple[list[Outcome], int, float]:
        async with httpx.AsyncClient(timeout=60.0) as client:
            tasks = await start_streams(client, server.url, 2, 900)
            server.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            started = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(exit_code, server.process, 10)
            elapsed_s = time.monotonic() - started
            results = await asyncio.gather(*tasks, return_exceptions=True)
            return [r for r in results if isinstance(r, Outcome)], code, elapsed_s

    outcomes, code, elapsed_s = asyncio.run(scenario())
    assert code == 128 + signal.SIGTERM, code
    assert elapsed_s < 5
    assert not any(o.complete for o in outcomes)  # cut off: that is what a second signal means
