"""Deadlines through the real app and the real engine (tiny model, real socket).

The engine's own counters are read directly (in-process), so "aborted and freed" means
exactly that: no sequence running or waiting and every KV block free afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.api.deadline import (
    MAX_REQUEST_TIMEOUT_S,
    effective_timeout_s,
    parse_timeout_header,
)
from app.api.errors import APIError
from app.config import Settings
from app.main import create_app
from tests.api.conftest import ThreadedServer
from tests.reliability.conftest import failure_counts

LONG = {"prompt": "Hello", "max_tokens": 900, "ignore_eos": True}


class Served:
    def __init__(self, server: ThreadedServer, app) -> None:
        self.url = server.url
        self.engine = app.state.server.serving.engine
        self.admission = app.state.server.admission

    def wait_until_idle(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            stats = self.engine.stats()
            idle = stats.num_running == stats.num_waiting == 0
            if (
                idle
                and stats.num_free_blocks == stats.num_blocks
                and not self.admission.num_in_flight
            ):
                return
            time.sleep(0.01)
        raise AssertionError(f"not idle: {self.engine.stats()}")


def serve(model_path, **overrides) -> Iterator[Served]:
    settings = Settings(model=model_path, kv_cache_gb=0.02, max_model_len=1024, **overrides)
    app = create_app(settings)
    with ThreadedServer(app) as server:
        yield Served(server, app)


@pytest.fixture(scope="module")
def one_slot(tiny_model_path) -> Iterator[Served]:
    """One running sequence at a time, so a second request must wait in the queue."""
    yield from serve(tiny_model_path, max_num_seqs=1)


@pytest.fixture(scope="module")
def server_timeout(tiny_model_path) -> Iterator[Served]:
    yield from serve(tiny_model_path, request_timeout_s=0.4)


def timed_post(url: str, body: dict, headers: dict | None = None) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=30)
    return response, time.monotonic() - started


def test_a_plain_request_past_its_deadline_gets_504_and_is_freed(one_slot: Served) -> None:
    response, elapsed_s = timed_post(one_slot.url, LONG, {"X-Request-Timeout": "0.3"})
    assert response.status_code == 504, response.text
    error = response.json()["error"]
    assert error["type"] == "timeout_error" and error["code"] == "request_timeout"
    assert "0.3 s" in error["message"]
    assert 0.3 <= elapsed_s < 2.0
    one_slot.wait_until_idle()


def test_a_stream_past_its_deadline_ends_with_an_error_event(one_slot: Served) -> None:
    timeouts_before = failure_counts(one_slot.url)["timeout"]
    body = {**LONG, "stream": True}
    events = []
    with httpx.stream(
        "POST", one_slot.url + "/v1/completions", json=body,
        headers={"X-Request-Timeout": "0.3"}, timeout=30,
    ) as response:  # fmt: skip
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data:")]
    assert len(events) > 2, "some tokens arrive before the deadline"
    assert events[-1] == "data: [DONE]"
    assert '"code":"request_timeout"' in events[-2]
    one_slot.wait_until_idle()
    # The status said 200: the metrics still count it as a timeout, not an abort.
    assert failure_counts(one_slot.url)["timeout"] == timeouts_before + 1


def test_a_deadline_also_runs_while_queued(one_slot: Served) -> None:
    import threading

    # Takes the only running slot for about a second (its own deadline ends it).
    holder = threading.Thread(
        target=timed_post, args=(one_slot.url, LONG, {"X-Request-Timeout": "1.0"})
    )
    holder.start()
    time.sleep(0.2)
    response, elapsed_s = timed_post(
        one_slot.url, {"prompt": "queued", "max_tokens": 5}, {"X-Request-Timeout": "0.2"}
    )
    holder.join(30)
    assert response.status_code == 504, response.text
    assert elapsed_s < 1.5
    one_slot.wait_until_idle()


def test_a_request_within_its_deadline_is_untouched(one_slot: Served) -> None:
    response, _ = timed_post(
        one_slot.url, {"prompt": "Hi", "max_tokens": 5, "ignore_eos": True},
        {"X-Request-Timeout": "30"},
    )  # fmt: skip
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 5


def test_the_server_timeout_applies_and_a_header_cannot_extend_it(server_timeout: Served) -> None:
    for headers in (None, {"X-Request-Timeout": "100"}):
        response, elapsed_s = timed_post(server_timeout.url, LONG, headers)
        assert response.status_code == 504, response.text
        assert "0.4 s" in response.json()["error"]["message"]
        assert elapsed_s < 2.0
    shorter, elapsed_s = timed_post(server_timeout.url, LONG, {"X-Request-Timeout": "0.1"})
    assert shorter.status_code == 504 and "0.1 s" in shorter.json()["error"]["message"]
    server_timeout.wait_until_idle()


def test_a_tgi_request_past_its_deadline_gets_504(server_timeout: Served) -> None:
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 900}}
    response = httpx.post(server_timeout.url + "/generate", json=body, timeout=30)
    assert response.status_code == 504
    assert response.json()["error_type"] == "generation"  # TGI clients read this field


@given(st.text(max_size=30))
@settings(max_examples=300, deadline=None, derandomize=True)
def test_any_header_value_parses_or_is_a_400(raw: str) -> None:
    try:
        value = parse_timeout_header(raw)
    except APIError as error:
        assert error.status_code == 400 and error.param == "X-Request-Timeout"
        return
    assert value is not None and 0 < value <= MAX_REQUEST_TIMEOUT_S


@given(
    st.one_of(st.none(), st.floats(0.001, 1e4)),
    st.one_of(st.none(), st.floats(0.001, 1e4)),
)
def test_a_client_can_only_shorten_the_server_timeout(header, server) -> None:
    effective = effective_timeout_s(header, server)
    if server is not None:
        assert effective is not None and effective <= server
    if header is not None:
        assert effective is not None and effective <= header
    if header is None and server is None:
        assert effective is None
