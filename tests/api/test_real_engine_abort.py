"""A client that leaves aborts its request in the real engine (tiny random model,
in-process server, so the engine's own counters can be read)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from app.config import Settings
from app.main import create_app
from tests.api.conftest import ThreadedServer

MAX_TOKENS = 400


@pytest.fixture(scope="module")
def tiny_server(tiny_model_path) -> Iterator[tuple[str, object]]:
    settings = Settings(model=tiny_model_path, kv_cache_gb=0.05, max_model_len=1024)
    app = create_app(settings)
    with ThreadedServer(app) as server:
        yield server.url, app.state.server.serving.engine


def wait_until_idle(engine, aborted: list[tuple[str, object]], timeout_s: float = 10.0) -> None:
    """Wait for the server to abort the request (on a loaded machine the client may
    leave before the request even reached the engine), then for no sequence to be
    pending, running or waiting, and for steps to stop.

    `engine.stats()` is a snapshot the engine thread refreshes after each turn of its
    loop: the one current when the abort was called may predate the request's add (the
    thread had not woken up yet), so only a later snapshot can show the abort applied."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = engine.stats()
        idle = not (stats.num_running or stats.num_waiting or stats.num_pending_requests)
        if aborted and idle and all(stats is not seen for _, seen in aborted):
            time.sleep(0.2)
            assert engine.stats().num_steps == stats.num_steps, "the engine kept stepping"
            return
        time.sleep(0.01)
    raise AssertionError(f"engine still busy: {engine.stats()}")


@pytest.fixture
def slow_steps(tiny_server, monkeypatch) -> list[tuple[str, object]]:
    """Each engine step takes at least 5 ms: the tiny model can compute MAX_TOKENS
    tokens before the client leaves (a 0.3 s timeout, or three events read), and the
    request would not be abandoned in flight. Returns the ids the server aborts, each
    with the engine's stats snapshot at that moment."""
    engine = tiny_server[1]
    runner, execute, abort = engine.core.runner, engine.core.runner.execute, engine.abort
    aborted: list[tuple[str, object]] = []

    def slow_execute(batch):
        time.sleep(0.005)
        return execute(batch)

    def recorded_abort(request_id: str, reason: str = "request aborted") -> None:
        aborted.append((request_id, engine.stats()))
        abort(request_id, reason)

    monkeypatch.setattr(runner, "execute", slow_execute)
    monkeypatch.setattr(engine, "abort", recorded_abort)
    return aborted


LONG = {"prompt": "Hello", "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0}


def test_leaving_a_stream_aborts_in_the_engine(tiny_server, slow_steps) -> None:
    url, engine = tiny_server
    steps_before = engine.stats().num_steps
    with httpx.stream("POST", url + "/v1/completions", json={**LONG, "stream": True}) as r:
        data = (line for line in r.iter_lines() if line.startswith("data:"))
        for _ in range(3):
            next(data)
    wait_until_idle(engine, slow_steps)
    assert engine.stats().num_steps - steps_before < MAX_TOKENS


def test_leaving_before_a_plain_answer_aborts_in_the_engine(tiny_server, slow_steps) -> None:
    url, engine = tiny_server
    steps_before = engine.stats().num_steps
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=LONG, timeout=0.3)
    wait_until_idle(engine, slow_steps)
    assert engine.stats().num_steps - steps_before < MAX_TOKENS
    ok = httpx.post(url + "/v1/completions", json={**LONG, "max_tokens": 3}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
