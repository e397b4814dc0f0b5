"""The Responses API's refusals, failures and cancel.

Refusals: a field, item, part or tool lamina does not run is a 400 naming it, and
nothing reaches the engine. A stream that fails ends with `response.failed`; a client
that leaves leaves a stored response "failed". Cancel stops the run in the engine:
the fake engine records the abort; the real server's running count returns to 0.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from fastapi import FastAPI
from openai import OpenAI

from app.tokenizer import ChatTemplateError, Tokenizer
from tests.api.conftest import FakeApp, LiveServer, ThreadedServer, fake_app_for, fake_settings
from tests.api.fake_engine import FakeEngine
from tests.observability.exposition import parse

IMAGE = {"type": "input_image", "image_url": "https://example.com/a.png"}
REFUSED = [
    ({"input": [{"role": "user", "content": [IMAGE]}]}, "input[0].content[0].type"),
    ({"input": [{"role": "user", "content": []}]}, "input[0].content"),
    ({"input": [{"type": "input_file", "file_id": "f"}]}, "input[0].type"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"input": "Hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "Hi", "tools": [{"type": "file_search", "vector_store_ids": []}]}, "tools[0].type"),
    ({"input": "Hi", "reasoning": {"effort": "low"}}, "reasoning"),
    ({"input": "Hi", "include": ["message.output_text.logprobs"]}, "include"),
    ({"input": "Hi", "background": True}, "background"),
    ({"input": "Hi", "truncation": "auto"}, "truncation"),
    ({"input": "Hi", "conversation": "conv_1"}, "conversation"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": [{"type": "function_call", "name": "f"}]}, "input[0]"),
    ({"input": []}, "input"),
    ({}, "input"),
    ({"input": "Hi", "text": {"format": {"type": "yaml"}}}, "text.format"),
    ({"input": "Hi", "tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name"),
    ({"input": "Hi", "tool_choice": "required"}, "tool_choice"),
    ({"input": "Hi", "previous_response_id": "resp_unknown"}, "previous_response_id"),
    ({"input": "Hi", "metadata": {str(i): "v" for i in range(17)}}, "metadata"),
]


@pytest.fixture(scope="module")
def slow_app(default_model_path: Path) -> Iterator[tuple[LiveServer, FastAPI]]:
    """A fake engine that takes 20 ms a token, with a long reply; and its app."""
    engine = FakeEngine(Tokenizer(default_model_path), token_interval_s=0.02)
    engine.reply = " and then" * 200
    app = fake_app_for(fake_settings(default_model_path), engine)
    with ThreadedServer(app) as server:
        yield LiveServer(server.url, "unused", engine.max_model_len, engine), app


@pytest.fixture
def slow_fake(slow_app: tuple[LiveServer, FastAPI]) -> LiveServer:
    return slow_app[0]


def client_of(server: LiveServer) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize(("body", "param"), REFUSED)
def test_unsupported_or_broken_input_is_a_400_naming_it(
    slow_fake: LiveServer, body: dict, param: str
) -> None:
    num_requests = len(slow_fake.engine.requests)
    for stream in (False, True):
        response = httpx.post(slow_fake.url + "/v1/responses", json={**body, "stream": stream})
        assert response.status_code in (400, 404), response.text
        assert response.json()["error"]["param"] == param, response.text
    assert len(slow_fake.engine.requests) == num_requests  # nothing reached the engine


# What chat's own checks refuse, named as the Responses request sent it, not as chat's
# `messages[i]`: instructions and merged calls shift the messages' indices.
CALL = {"type": "function_call", "name": "f", "call_id": "c1", "arguments": "{}"}
HI = {"role": "user", "content": "Hi"}
CHAT_CHECKS = [
    ({"instructions": "Be brief.", "input": [HI, {**CALL, "arguments": "[1]"}]},
     "input[1].arguments"),
    ({"input": [{"role": "assistant", "content": "Let me see."}, CALL,
                {**CALL, "call_id": "c2", "arguments": "not json"}]}, "input[2].arguments"),
    ({"input": [HI, CALL, {"type": "function_call_output", "call_id": "", "output": "x"}]},
     "input[2].call_id"),
    ({"input": "word " * 50_000}, "input"),
    ({"input": [HI], "max_output_tokens": 10**9}, "max_output_tokens"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "param"), CHAT_CHECKS)
def test_chat_checks_name_the_field_the_request_sent(
    slow_fake: LiveServer, body: dict, param: str
) -> None:
    response = httpx.post(slow_fake.url + "/v1/responses", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert f"`{param}`" in error["message"] and "messages" not in error["message"]


@pytest.mark.anyio
async def test_a_chat_template_refusal_names_input(
    fake_app: FakeApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> str:
        raise ChatTemplateError("chat template failed: roles must alternate")

    monkeypatch.setattr(Tokenizer, "_render", refuse)
    response = await fake_app.client.post("/v1/responses", json={"input": "Hi"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("input", "chat_template_error")


def test_a_failure_in_the_engine_ends_the_stream_with_response_failed(
    slow_fake: LiveServer,
) -> None:
    client = client_of(slow_fake)
    events = list(client.responses.create(input="FAIL_IN_ENGINE", stream=True))
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "failed"
    assert "injected failure" in events[-1].response.error.message
    assert client.responses.retrieve(events[-1].response.id).status == "failed"
    with pytest.raises(openai.InternalServerError):
        client.responses.create(input="FAIL_IN_ENGINE")


def test_a_client_that_leaves_leaves_the_response_failed(slow_fake: LiveServer) -> None:
    client = client_of(slow_fake)
    stream = client.responses.create(input="Go on.", stream=True)
    created = next(iter(stream))
    assert client.responses.retrieve(created.response.id).status == "in_progress"
    stream.close()
    deadline = time.monotonic() + 10
    while client.responses.retrieve(created.response.id).status == "in_progress":
        assert time.monotonic() < deadline, "the response stayed in progress"
        time.sleep(0.05)
    assert client.responses.retrieve(created.response.id).status == "failed"


def cancel_after_first_delta(client: OpenAI, **request: object) -> tuple[list, object]:
    """Stream a long response, cancel it once its first text arrived; its events (the
    stream read to its end) and what cancel returned."""
    events, cancelled = [], None
    for event in client.responses.create(stream=True, **request):
        events.append(event)
        if event.type == "response.output_text.delta" and cancelled is None:
            cancelled = client.responses.cancel(events[0].response.id)
    return events, cancelled


def test_cancel_stops_the_run_in_the_engine(slow_fake: LiveServer) -> None:
    client = client_of(slow_fake)
    events, cancelled = cancel_after_first_delta(client, input="Go on.")
    assert cancelled.status == "cancelled"
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "cancelled"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert slow_fake.engine.aborted[-1].startswith(cancelled.id)
    assert client.responses.retrieve(cancelled.id).status == "cancelled"
    # The answer so far is kept, its message marked incomplete.
    stored = client.responses.retrieve(cancelled.id)
    assert stored.output_text and slow_fake.engine.reply.startswith(stored.output_text)
    assert stored.output[0].status == "incomplete"


def running_now(server: LiveServer) -> float:
    metrics = parse(httpx.get(server.url + "/metrics", timeout=10).text)
    return metrics.value("lamina:num_requests_running")


@pytest.mark.system
@pytest.mark.slow
def test_cancel_of_a_long_stream_frees_the_real_engine(api_server: LiveServer) -> None:
    client = client_of(api_server)
    request = {"input": "Count from 1 to 1000, one number per line.", "temperature": 0,
               "max_output_tokens": 1500}  # fmt: skip
    events, cancelled = cancel_after_first_delta(client, **request)
    assert cancelled.status == "cancelled"
    assert events[-1].response.status == "cancelled"
    assert events[-1].response.usage.output_tokens < 1500
    deadline = time.monotonic() + 20
    while running_now(api_server) != 0:
        assert time.monotonic() < deadline, "the engine still runs the cancelled response"
        time.sleep(0.05)


def test_cancel_from_another_thread_while_a_plain_request_waits(
    slow_app: tuple[LiveServer, FastAPI],
) -> None:
    """A response that is not streamed can be cancelled too (its id is in the store);
    the waiting client gets the response with status "cancelled"."""
    server, app = slow_app
    store = app.state.server.serving.responses
    client = client_of(server)
    answer: list = []
    waiting = threading.Thread(
        target=lambda: answer.append(client.responses.create(input="Go on, slowly."))
    )
    waiting.start()
    deadline = time.monotonic() + 10
    while not (running := [id_ for id_ in store.ids() if store.get(id_).running]):
        assert time.monotonic() < deadline, "the response never started"
        time.sleep(0.01)
    client.responses.cancel(running[0])
    waiting.join(10)
    assert answer[0].status == "cancelled" and answer[0].id == running[0]
