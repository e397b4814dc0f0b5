"""Streaming edge cases: keep-alive comments, failures after the stream began, and
clients that leave (streaming or not) aborting their request in the engine."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.api.conftest import ThreadedServer, fake_app_for, fake_settings, running_fake_app
from tests.api.fake_engine import DEFAULT_REPLY, FakeEngine

CHAT = "/v1/chat/completions"
FAIL = "FAIL_IN_ENGINE"


def data_lines(body: str) -> list[str]:
    return [line[len("data: ") :] for line in body.split("\n") if line.startswith("data: ")]


@pytest.mark.anyio
async def test_keepalive_comments_fill_long_silences(default_model_path, http_tokenizer) -> None:
    engine = FakeEngine(http_tokenizer, token_interval_s=0.25)
    settings = fake_settings(default_model_path, keepalive_interval_s=0.05)
    async with running_fake_app(settings, engine) as fake:
        response = await fake.client.post(
            "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stream": True}
        )
    assert ": keep-alive\n\n" in response.text
    chunks = [json.loads(d) for d in data_lines(response.text) if d != "[DONE]"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == http_tokenizer.decode(
        engine.reply_ids()[:2]
    )


@pytest.mark.anyio
async def test_engine_failure_mid_stream_is_an_error_event(fake_app) -> None:
    messages = [{"role": "user", "content": f"please {FAIL}"}]
    response = await fake_app.client.post(
        CHAT, json={"messages": messages, "stream": True, "max_tokens": 5}
    )
    assert response.status_code == 200
    events = data_lines(response.text)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "generation_error" and "injected failure" in error["message"]
    assert json.loads(events[1])["choices"][0]["delta"]["content"]  # one token came first


@pytest.mark.anyio
async def test_engine_failure_without_stream_is_a_500_envelope(fake_app) -> None:
    for path, body in [
        (CHAT, {"messages": [{"role": "user", "content": FAIL}]}),
        ("/generate", {"inputs": FAIL}),
    ]:
        response = await fake_app.client.post(path, json=body)
        assert response.status_code == 500
        assert response.json()["error"]["type"] == "server_error"
        assert "injected failure" in response.json()["error"]["message"]
    tgi = await fake_app.client.post("/generate_stream", json={"inputs": FAIL})
    error_event = json.loads(data_lines(tgi.text)[-2])
    assert error_event["error_type"] == "generation" and error_event["error"]["message"]


@pytest.fixture(scope="module")
def slow_server(default_model_path, http_tokenizer) -> Iterator[tuple[str, FakeEngine]]:
    # A long reply: routes without ignore_eos (TGI) still run for seconds.
    engine = FakeEngine(http_tokenizer, reply=DEFAULT_REPLY * 40, token_interval_s=0.02)
    with ThreadedServer(fake_app_for(fake_settings(default_model_path), engine)) as server:
        yield server.url, engine


def wait_for_abort(engine: FakeEngine, request_id: str, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if request_id in engine.aborted:
            return True
        time.sleep(0.02)
    return False


LONG = {"ignore_eos": True, "max_tokens": 2000}


@pytest.mark.parametrize("path", ["/v1/completions", CHAT, "/generate_stream"])
def test_client_leaving_a_stream_aborts_the_request(slow_server, path) -> None:
    url, engine = slow_server
    if path == "/generate_stream":
        body = {"inputs": "Hi", "parameters": {"max_new_tokens": 2000}}
    elif path == CHAT:
        body = {"messages": [{"role": "user", "content": "Hi"}], "stream": True, **LONG}
    else:
        body = {"prompt": "Hi", "stream": True, **LONG}
    with httpx.stream("POST", url + path, json=body, timeout=30) as response:
        lines = response.iter_lines()
        while not next(lines).startswith("data:"):
            pass
        request_id = engine.requests[-1].request_id
    assert wait_for_abort(engine, request_id), f"{request_id} not aborted"


@pytest.mark.parametrize("path", ["/v1/completions", "/generate"])
def test_client_leaving_before_a_plain_answer_aborts_the_request(slow_server, path) -> None:
    url, engine = slow_server
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 2000}}
    if path == "/v1/completions":
        body = {"prompt": "Hi", **LONG}
    num_before = len(engine.requests)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + path, json=body, timeout=0.5)
    assert len(engine.requests) == num_before + 1
    assert wait_for_abort(engine, engine.requests[-1].request_id)
