"""Three lamina replicas behind SGLang's model gateway (`sglang-router` from PyPI, its
cache-aware policy), for real, on loopback.

In file order, against one fleet:
1. the router registers every replica under lamina's model name (from /server_info);
2. a conversation sharing a long system prompt lands on one replica: its prefix-cache
   counters grow, the other replicas' do not move;
3. that replica gets SIGTERM while a stream of the conversation is in flight on it:
   the stream finishes whole, the replica exits 0, and the conversation goes on on
   another replica with no failed request (the router's readiness checks and retries);
4. a second replica is killed (SIGKILL) with streams in flight: those streams end
   with an error, never with `data: [DONE]`, and every new request succeeds on the
   replica left;
5. the router's metrics hold every series the Grafana dashboard reads from it.

The replicas serve a tiny random LLaMA (the `tiny_model_path` fixture) with
`ignore_eos`, one thread each, so the three fit the test machines' two cores.
"""

from __future__ import annotations

import re
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app.bench.fleet import prefix_cache_counts
from tests.server_process import ServerProcess, engine_available, takes_servers
from tests.system.deploy_files import ROUTER_SERIES, load_dashboard, metric_names_in_dashboard
from tests.system.router_fleet import (
    BackgroundStream,
    Conversation,
    Router,
    planned_replicas,
    router_installed,
    start_replicas,
    start_router,
)

pytestmark = [pytest.mark.system, pytest.mark.slow]

DRAIN_TIMEOUT_S = 60
NUM_REPLICAS = 3


@dataclass
class Fleet:
    replicas: list[ServerProcess]
    router: Router
    model: str

    def alive(self) -> list[ServerProcess]:
        return [r for r in self.replicas if r.process is not None and r.process.poll() is None]

    def counts(self) -> dict[str, tuple[float, float]]:
        return {r.url: prefix_cache_counts(r.url) for r in self.alive()}

    def conversation(self) -> Conversation:
        return Conversation(self.router.url, self.model, uuid.uuid4().hex)

    def home_of(self, conversation: Conversation, turns: int) -> ServerProcess:
        """Run `turns` turns and return the one replica whose prefix cache they used;
        fails unless exactly one replica was looked up and hit."""
        before = self.counts()
        for turn in range(turns):
            response = conversation.say(f"question {turn}: tell me about item {turn * 7}")
            assert response.status_code == 200, response.text
        after = self.counts()
        queried = [url for url in after if after[url][0] > before[url][0]]
        hit = [url for url in after if after[url][1] > before[url][1]]
        assert len(queried) == 1, f"the turns reached {queried}: {before} -> {after}"
        assert hit == queried, f"prefix hits on {hit}, lookups on {queried}"
        return next(r for r in self.replicas if r.url == queried[0])


@pytest.fixture(scope="module")
@takes_servers(planned_replicas(NUM_REPLICAS, DRAIN_TIMEOUT_S, router_installed))
def fleet(tiny_model_path: Path) -> Iterator[Fleet]:
    if not engine_available():
        pytest.skip("the engine is not in the tree")
    if not router_installed():
        pytest.skip(
            "sglang-router is not installed: its wheels are for Linux x86_64 and aarch64 "
            "(pip install -e '.[test]')"
        )
    replicas = start_replicas(NUM_REPLICAS, tiny_model_path, DRAIN_TIMEOUT_S)
    router = None
    try:
        model = httpx.get(replicas[0].url + "/v1/models", timeout=5).json()["data"][0]["id"]
        router = start_router([r.url for r in replicas], model)
        yield Fleet(replicas, router, model)
    finally:
        if router is not None:
            router.stop()
        for replica in replicas:
            replica.stop()


def test_router_registers_replicas_under_the_model_name(fleet: Fleet) -> None:
    workers = fleet.router.workers()
    assert sorted(w["url"] for w in workers) == sorted(r.url for r in fleet.replicas)
    assert {w["model_id"] for w in workers} == {fleet.model}
    listed = httpx.get(fleet.router.url + "/v1/models", timeout=5).json()["data"]
    assert [card["id"] for card in listed] == [fleet.model]


def test_conversation_sticks_to_one_replica(fleet: Fleet) -> None:
    home = fleet.home_of(fleet.conversation(), turns=4)
    assert home in fleet.alive()


def test_drain_completes_in_flight_and_moves_the_conversation(fleet: Fleet) -> None:
    conversation = fleet.conversation()
    home = fleet.home_of(conversation, turns=3)
    stream = BackgroundStream(fleet.router.url, conversation.body(max_tokens=400, stream=True))
    stream.start()
    assert stream.first_event.wait(60), "the stream sent nothing"
    home.process.send_signal(signal.SIGTERM)

    for turn in range(3, 7):
        response = conversation.say(f"question {turn} after the drain began")
        assert response.status_code == 200, f"turn {turn}: {response.text}"
    stream.join(120)
    assert stream.error is None and stream.status == 200, stream.error
    assert stream.done and stream.finish_reason == "length", stream.events[-3:]
    assert home.process.wait(DRAIN_TIMEOUT_S + 30) == 0, home.log_tail()
    assert "draining: 1 generation requests in flight" in home.log_path.read_text()
    # The conversation's later turns were cached where they went.
    assert any(hits > 0 for _, hits in fleet.counts().values())


def test_killed_replica_fails_its_streams_and_gets_no_new_requests(fleet: Fleet) -> None:
    conversation = fleet.conversation()
    victim = fleet.home_of(conversation, turns=2)
    streams = [
        BackgroundStream(fleet.router.url, conversation.body(max_tokens=400, stream=True))
        for _ in range(3)
    ]
    for stream in streams:
        stream.start()
    for stream in streams:
        assert stream.first_event.wait(60), "a stream sent nothing"
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait(10)

    survivors = fleet.alive()
    before = fleet.counts()
    for turn in range(2, 6):
        response = conversation.say(f"question {turn} after the kill")
        assert response.status_code == 200, f"turn {turn}: {response.text}"
    for stream in streams:
        stream.join(60)
        # The router cuts the client's response (seen: an incomplete chunked body).
        assert isinstance(stream.error, httpx.RemoteProtocolError | httpx.ReadError), stream.error
        assert not stream.done and stream.finish_reason is None, stream.events[-3:]
    after = fleet.counts()
    assert [r.url for r in survivors] == list(after)
    assert sum(after[url][0] - before[url][0] for url in after) > 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        health = {w["url"]: w["is_healthy"] for w in fleet.router.workers()}
        if health.get(victim.url) is False:
            break
        time.sleep(0.2)
    assert health.get(victim.url) is False, health


def test_router_exposes_the_series_the_dashboard_uses(fleet: Fleet) -> None:
    # After the requests above (the dashboard's router panels read these).
    text = httpx.get(fleet.router.metrics_url, timeout=5).text
    exposed = set(re.findall(r"^([A-Za-z_:][\w:]*)[{ ]", text, re.MULTILINE))
    assert exposed >= ROUTER_SERIES, sorted(exposed)
    assert metric_names_in_dashboard(load_dashboard()) >= ROUTER_SERIES
