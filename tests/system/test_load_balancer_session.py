"""nginx's session-affinity variant (deploy/nginx/nginx-session.conf), for real, on
loopback: two `lamina serve` processes behind nginx hashing on X-Session-Id.

In file order, against one topology:
1. each of 24 sessions sends all its requests to one replica (nginx's access log names
   the upstream of every request id), and the sessions use both replicas;
2. a conversation with a long system prompt under one session id uses one replica's
   prefix cache (its counters grow, the other's do not move);
3. that replica is killed (SIGKILL): the session's next turns succeed on the other.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app.bench.fleet import prefix_cache_counts
from app.bench.spawn import wait_until_answering
from tests.server_process import ServerProcess, engine_available, free_port, takes_servers
from tests.system.deploy_files import DEPLOY, tool
from tests.system.router_fleet import Conversation, planned_replicas, start_replicas
from tests.system.test_load_balancer import _stop, loopback

pytestmark = [pytest.mark.system, pytest.mark.slow]


@dataclass
class SessionTopology:
    replicas: list[ServerProcess]
    url: str
    workdir: Path
    model: str

    def upstreams_by_request_id(self, expected: set[str]) -> dict[str, str]:
        """request id -> upstream, from nginx's access log, once every expected id is in
        it: nginx writes a request's line as the request ends, maybe just after the
        client has its answer (up to 5 s, then what is there)."""
        deadline = time.monotonic() + 5.0
        while True:
            lines = (self.workdir / "access.log").read_text().splitlines()
            entries = [json.loads(line) for line in lines if line.strip()]
            logged = {entry["request_id"]: entry["upstream"] for entry in entries}
            if expected <= logged.keys() or time.monotonic() > deadline:
                return logged
            time.sleep(0.05)

    def counts(self) -> dict[str, tuple[float, float]]:
        alive = [r for r in self.replicas if r.process.poll() is None]
        return {r.url: prefix_cache_counts(r.url) for r in alive}


def _nginx_found() -> bool:
    return shutil.which("nginx") is not None or Path("/usr/sbin/nginx").exists()


@pytest.fixture(scope="module")
@takes_servers(planned_replicas(2, runs=_nginx_found))
def topology(
    tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SessionTopology]:
    nginx_binary = tool("nginx")
    if not engine_available():
        pytest.skip("the engine is not in the tree")
    workdir = tmp_path_factory.mktemp("session-balancer")
    replicas = start_replicas(2, tiny_model_path)
    nginx = None
    try:
        listen_port = free_port()
        addresses = [r.url.removeprefix("http://") for r in replicas]
        config = loopback.write_loopback_config(
            workdir, listen_port, addresses, DEPLOY / "nginx/nginx-session.conf"
        )
        nginx = subprocess.Popen(
            [nginx_binary, "-p", str(workdir), "-c", str(config), "-e", str(workdir / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{listen_port}"
        wait_until_answering(f"{url}/nginx-health", nginx, "nginx", 20.0)
        model = httpx.get(url + "/v1/models", timeout=5).json()["data"][0]["id"]
        yield SessionTopology(replicas, url, workdir, model)
    finally:
        if nginx is not None:
            _stop(nginx, signal.SIGQUIT)
        for replica in replicas:
            replica.stop()


def test_each_session_sticks_to_one_replica(topology: SessionTopology) -> None:
    sent: dict[str, list[str]] = defaultdict(list)  # session -> request ids
    with httpx.Client(base_url=topology.url, timeout=60) as client:
        for _turn in range(2):
            for session in range(24):
                request_id = uuid.uuid4().hex
                response = client.post(
                    "/v1/completions",
                    json={"prompt": f"session {session}", "max_tokens": 2, "ignore_eos": True},
                    headers={"X-Session-Id": f"user-{session}", "X-Request-Id": request_id},
                )
                assert response.status_code == 200, response.text
                sent[f"user-{session}"].append(request_id)
    upstreams = topology.upstreams_by_request_id({r for ids in sent.values() for r in ids})
    by_session = {s: {upstreams[r] for r in ids} for s, ids in sent.items()}
    assert all(len(used) == 1 for used in by_session.values()), by_session
    # 24 sessions all hashed onto one of two replicas: odds of about 1 in 8 million.
    assert len(set().union(*by_session.values())) == 2, by_session


def test_a_conversation_uses_one_replicas_prefix_cache(topology: SessionTopology) -> None:
    conversation = Conversation(
        topology.url, topology.model, uuid.uuid4().hex, headers={"X-Session-Id": "chat-1"}
    )
    before = topology.counts()
    for turn in range(4):
        assert conversation.say(f"question {turn}").status_code == 200
    after = topology.counts()
    moved = [url for url in after if after[url] != before[url]]
    assert len(moved) == 1, f"{before} -> {after}"
    assert after[moved[0]][1] > before[moved[0]][1]


def test_a_sessions_turns_move_when_its_replica_dies(topology: SessionTopology) -> None:
    conversation = Conversation(
        topology.url, topology.model, uuid.uuid4().hex, headers={"X-Session-Id": "chat-2"}
    )
    before = topology.counts()
    assert conversation.say("first question").status_code == 200
    after = topology.counts()
    [home_url] = [url for url in after if after[url] != before[url]]
    home = next(r for r in topology.replicas if r.url == home_url)
    home.process.send_signal(signal.SIGKILL)
    home.process.wait(10)
    for turn in range(3):
        response = conversation.say(f"question {turn} after the kill")
        assert response.status_code == 200, response.text
