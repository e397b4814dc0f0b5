"""The load-balanced topology, for real, on loopback: two `lamina serve` processes and
nginx (Debian's package) with the configuration rendered from deploy/nginx/nginx.conf.

In file order, against one topology:
1. 64 concurrent streams through nginx all complete, and both replicas served some
   (read from each replica's /metrics and, as a second witness, nginx's access log);
2. request ids: a client's own X-Request-Id comes back unchanged through nginx; a
   request without one gets the id nginx made (the one in nginx's access log);
3. replica A is killed with SIGKILL: new requests through nginx keep succeeding;
4. replica B gets SIGTERM while streams are in flight on it: every stream finishes
   whole and B exits 0 (the drain).

The replicas serve a tiny random LLaMA (the `tiny_model_path` fixture) with
`ignore_eos`, so every stream has an exact length and the suite stays fast on 2 cores.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app.bench.spawn import wait_until_answering
from tests.server_process import engine_available, takes_servers
from tests.system import deploy_files
from tests.system.router_fleet import planned_replicas, start_replicas

ROOT = Path(__file__).resolve().parents[2]
DRAIN_TIMEOUT_S = 30

pytestmark = [pytest.mark.system, pytest.mark.slow]


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


loopback = _load_module(ROOT / "deploy/nginx/loopback.py", "nginx_loopback")


def _nginx_binary() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if found is None:
        pytest.skip("nginx is not installed: `make system-deps` (apt-get install nginx-light)")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Replica:
    name: str
    port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def log_tail(self, num_chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:]


@dataclass
class Topology:
    replicas: list[Replica]
    nginx: subprocess.Popen
    url: str
    workdir: Path

    def access_log(self) -> list[dict]:
        lines = (self.workdir / "access.log").read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def access_log_upstreams(self) -> list[str]:
        return [entry["upstream"] for entry in self.access_log()]


def _stop(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _nginx_found() -> bool:
    return shutil.which("nginx") is not None or Path("/usr/sbin/nginx").exists()


@pytest.fixture(scope="module")
@takes_servers(planned_replicas(2, DRAIN_TIMEOUT_S, runs=_nginx_found))
def topology(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    """Two replicas from the server pool (loaded while earlier tests run) behind nginx."""
    nginx_binary = _nginx_binary()
    if not engine_available():
        pytest.skip("the engine is not in the tree")
    workdir = tmp_path_factory.mktemp("load-balancer")
    servers = start_replicas(2, tiny_model_path, DRAIN_TIMEOUT_S)
    replicas = [
        Replica(name, server.port, server.process, server.log_path)
        for name, server in zip(("a", "b"), servers, strict=True)
    ]
    nginx = None
    try:
        listen_port = _free_port()
        config = loopback.write_loopback_config(workdir, listen_port, [r.address for r in replicas])
        nginx = subprocess.Popen(
            [nginx_binary, "-p", str(workdir), "-c", str(config), "-e", str(workdir / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{listen_port}"
        wait_until_answering(f"{url}/nginx-health", nginx, "nginx", 20.0)
        yield Topology(replicas, nginx, url, workdir)
    finally:
        if nginx is not None:
            _stop(nginx, signal.SIGQUIT)  # graceful: workers finish, master exits
        for replica in replicas:
            _stop(replica.process)


# --- client side ------------------------------------------------------------------------------


@dataclass
class StreamResult:
    status: int
    num_text_events: int
    completion_tokens: int | None
    finish_reason: str | None
    done: bool

    def complete(self, max_tokens: int) -> bool:
        return (
            self.status == 200
            and self.done
            and self.finish_reason == "length"
            and self.completion_tokens == max_tokens
        )


async def _stream_completion(
    client: httpx.AsyncClient,
    url: str,
    max_tokens: int,
    first_event: asyncio.Event | None = None,
) -> StreamResult:
    body = {
        "prompt": "The load balancer test says hello",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    num_text_events, usage_tokens, finish_reason, done = 0, None, None, False
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return StreamResult(response.status_code, 0, None, None, False)
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue  # blank separators and keep-alive comments
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                done = True
                break
            chunk = json.loads(payload)
            for choice in chunk.get("choices", []):
                num_text_events += 1
                finish_reason = choice.get("finish_reason") or finish_reason
                if first_event is not None:
                    first_event.set()
            if chunk.get("usage"):
                usage_tokens = chunk["usage"]["completion_tokens"]
    return StreamResult(200, num_text_events, usage_tokens, finish_reason, done)


async def _many_streams(url: str, num_streams: int, max_tokens: int) -> list[StreamResult]:
    limits = httpx.Limits(max_connections=num_streams)
    async with httpx.AsyncClient(timeout=120.0, limits=limits) as client:
        return await asyncio.gather(
            *(_stream_completion(client, url, max_tokens) for _ in range(num_streams))
        )


def _metrics(replica: Replica) -> dict[str, float]:
    """Sum of every sample per sample name in the replica's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{replica.url}/metrics", timeout=5.0)
    assert response.status_code == 200, (
        f"replica {replica.name}: GET /metrics {response.status_code}"
    )
    text = response.text
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def _num_succeeded(replica: Replica) -> float:
    return _metrics(replica).get("lamina:request_success_total", 0.0)


# --- the tests, in order ----------------------------------------------------------------------


def test_streams_through_nginx_reach_both_replicas(topology: Topology):
    before = [_num_succeeded(r) for r in topology.replicas]
    max_tokens = 16
    results = asyncio.run(_many_streams(topology.url, num_streams=64, max_tokens=max_tokens))
    incomplete = [r for r in results if not r.complete(max_tokens)]
    assert not incomplete, f"{len(incomplete)} of 64 streams incomplete, e.g. {incomplete[0]}"
    served = [_num_succeeded(r) - b for r, b in zip(topology.replicas, before, strict=True)]
    assert sum(served) == 64, served
    assert all(count > 0 for count in served), f"one replica served nothing: {served}"
    upstreams = {u for u in topology.access_log_upstreams() if u}
    assert {r.address for r in topology.replicas} <= upstreams


def test_metric_names_used_by_dashboards_and_alerts_are_exposed(topology: Topology):
    response = httpx.get(f"{topology.replicas[0].url}/metrics", timeout=5.0)
    assert response.status_code == 200, f"GET /metrics: {response.status_code}"
    text = response.text
    exposed = deploy_files.metric_types_from_exposition(text)
    used = deploy_files.metric_names_in_dashboard(deploy_files.load_dashboard())
    used |= deploy_files.metric_names_in_alert_rules(deploy_files.load_alert_rules())
    assert deploy_files.undefined_metric_names(used, exposed) == set()


def test_request_ids_through_nginx(topology: Topology):
    body = {"prompt": "Hi", "max_tokens": 2, "ignore_eos": True, "temperature": 0}

    def post(headers: dict[str, str]) -> httpx.Response:
        response = httpx.post(
            f"{topology.url}/v1/completions", json=body, headers=headers, timeout=60.0
        )
        assert response.status_code == 200, response.text
        return response

    # The client's id passes nginx unchanged: the replica answers with it, in the
    # header and in the body.
    client_id = f"lb-test.{uuid.uuid4().hex[:12]}:trace/1"
    response = post({"X-Request-Id": client_id})
    assert response.headers.get_list("x-request-id") == [client_id]
    assert response.json()["id"] == f"cmpl-{client_id}"

    # Without one, nginx makes the id (32 hex digits) and the replica uses it. lamina's
    # own ids look the same, so the access log tells whose it is: nginx logs the id it
    # sent upstream.
    response = post({})
    [generated] = response.headers.get_list("x-request-id")
    assert re.fullmatch(r"[0-9a-f]{32}", generated), generated
    assert response.json()["id"] == f"cmpl-{generated}"
    # nginx writes the access line as the request ends, maybe just after the client
    # has its answer.
    deadline = time.monotonic() + 5.0
    while True:
        logged = {e["request_id"]: e for e in topology.access_log()}
        if {client_id, generated} <= logged.keys() or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for request_id in (client_id, generated):
        assert request_id in logged, f"{request_id} not in nginx's access log"
        assert logged[request_id]["request"].startswith("POST /v1/completions")


def test_killed_replica_costs_no_new_request(topology: Topology):
    killed, survivor = topology.replicas
    _stop(killed.process, signal.SIGKILL)
    assert killed.process.returncode == -signal.SIGKILL
    before = _num_succeeded(survivor)
    max_tokens = 8
    results = asyncio.run(_many_streams(topology.url, num_streams=16, max_tokens=max_tokens))
    assert all(r.complete(max_tokens) for r in results), results
    # Plain (non-streaming) requests too, one after another: each may first hit the dead one.
    for _ in range(4):
        response = httpx.post(
            f"{topology.url}/v1/completions",
            json={"prompt": "Hi", "max_tokens": 4, "ignore_eos": True, "temperature": 0},
            timeout=60.0,
        )
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 4
    assert _num_succeeded(survivor) - before == 20


def test_drained_replica_loses_no_stream(topology: Topology):
    draining = topology.replicas[1]
    assert draining.process.poll() is None, "replica b must still be serving"
    max_tokens, num_streams = 384, 8

    async def scenario() -> tuple[list[StreamResult], float]:
        async with httpx.AsyncClient(timeout=120.0) as client:
            started = [asyncio.Event() for _ in range(num_streams)]
            tasks = [
                asyncio.create_task(_stream_completion(client, topology.url, max_tokens, event))
                for event in started
            ]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), timeout=60)
            running = await asyncio.to_thread(
                lambda: _metrics(draining).get("lamina:num_requests_running", 0.0)
            )
            draining.process.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks), running

    results, running_at_sigterm = asyncio.run(scenario())
    assert running_at_sigterm > 0, "no stream was in flight on the replica when it got SIGTERM"
    lost = [r for r in results if not r.complete(max_tokens)]
    assert not lost, f"{len(lost)} of {num_streams} streams lost in the drain: {lost[:2]}"
    try:
        exit_code = draining.process.wait(timeout=DRAIN_TIMEOUT_S + 15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"replica did not exit after the drain\n{draining.log_tail()}")
    assert exit_code == 0, draining.log_tail()
