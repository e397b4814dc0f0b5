"""Fixtures of the reliability tests.

- `start_server(env)`: a real `lamina serve` process on the tiny random LLaMA (the
  `tiny_model_path` fixture), stopped at the end of the test unless the test stopped it;
  `start_server()` takes the environment of the test's `server_env` marker, and the
  session starts that server ahead of time (tests/server_process.py, ServerPool).
- `shared_server`: one such process for the whole session (soak and fault tests), with
  the fault-injection marker set.
- `metrics_of(url)`: every sample of GET /metrics, summed per name.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import fake_app, http_tokenizer  # noqa: F401 - shared fixtures
from tests.server_process import SERVER_POOL, ServerProcess, engine_available, takes_servers

FAULT_MARKER = "INJECT-FAULT-7319"
# One torch thread: the other core stays free for the test's own clients.
TINY_ENV = {"LAMINA_DEVICE": "cpu", "LAMINA_NUM_THREADS": "1", "LAMINA_KV_CACHE_GB": "0.02"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def tiny_env(model_path: Path, **extra: str) -> dict[str, str]:
    return {**TINY_ENV, "LAMINA_MODEL": str(model_path), **extra}


def _planned_start_server(
    request: pytest.FixtureRequest, item: pytest.Item
) -> list[dict[str, str]]:
    marker = item.get_closest_marker("server_env")
    if not engine_available() or marker is None:
        return []
    return [tiny_env(request.getfixturevalue("tiny_model_path"), **marker.kwargs)]


@pytest.fixture
@takes_servers(_planned_start_server)
def start_server(
    tiny_model_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., ServerProcess]]:
    if not engine_available():
        pytest.skip("the engine is not in the tree")
    started: list[ServerProcess] = []
    marker = request.node.get_closest_marker("server_env")

    def start(**env: str) -> ServerProcess:
        if not env and marker is not None:
            env = marker.kwargs
        server = SERVER_POOL.start(tiny_env(tiny_model_path, **env), 120)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _planned_shared_server(
    request: pytest.FixtureRequest, item: pytest.Item
) -> list[dict[str, str]]:
    if not engine_available():
        return []
    tiny_model_path = request.getfixturevalue("tiny_model_path")
    return [tiny_env(tiny_model_path, LAMINA_FAULT_INJECTION_MARKER=FAULT_MARKER)]


@pytest.fixture(scope="session")
@takes_servers(_planned_shared_server)
def shared_server(tiny_model_path: Path) -> Iterator[ServerProcess]:
    if not engine_available():
        pytest.skip("the engine is not in the tree")
    env = tiny_env(tiny_model_path, LAMINA_FAULT_INJECTION_MARKER=FAULT_MARKER)
    server = SERVER_POOL.start(env, 120)
    try:
        yield server
    finally:
        server.stop()


def metrics_of(url: str) -> dict[str, float]:
    """Every sample of GET /metrics, summed per sample name."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(url + "/metrics", timeout=5.0)
    assert response.status_code == 200, f"GET /metrics: {response.status_code}"
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def failure_counts(url: str) -> dict[str, float]:
    """lamina:request_failure_total by reason."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=5.0).text
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "lamina:request_failure_total"
    }


def wait_until_idle(url: str, timeout_s: float = 15.0) -> dict[str, float]:
    """Poll /metrics until no HTTP request is in flight, nothing runs or waits and no KV
    block is in use. The engine can be idle (an aborted request's blocks freed) a moment
    before the HTTP layer has finished that request and counted its failure: waiting for
    the in-flight gauge too makes the failure counts read next complete."""
    deadline = time.monotonic() + timeout_s
    while True:
        sample = metrics_of(url)
        busy = {
            name: sample.get(name)
            for name in (
                "lamina:http_requests_in_flight",
                "lamina:num_requests_running",
                "lamina:num_requests_waiting",
                "lamina:kv_cache_usage_perc",
            )
        }
        if all(value == 0.0 for value in busy.values()):
            return sample
        if time.monotonic() > deadline:
            raise AssertionError(f"the server is not idle: {busy}")
        time.sleep(0.1)
