"""Request ids, request metrics and access logs over the fake engine (in-process, fast).

The fake engine's replies are known in advance, so every counter can be checked against
the usage the API returned. Engine-side metrics (steps, KV cache, latency histograms)
need the real engine: see test_real_server.py.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.tokenizer import Tokenizer
from tests.api.conftest import FakeApp, fake_settings, running_fake_app
from tests.api.fake_engine import FakeEngine
from tests.observability.exposition import Scrape, diff, parse

pytestmark = pytest.mark.anyio

SECRET_PROMPT = "purple-elephant-7781 says hello"


@pytest.fixture(scope="module")
def tokenizer(default_model_path: Path) -> Tokenizer:
    return Tokenizer(default_model_path)


@pytest.fixture
async def app(default_model_path: Path, tokenizer: Tokenizer) -> AsyncIterator[FakeApp]:
    async with running_fake_app(fake_settings(default_model_path), FakeEngine(tokenizer)) as app:
        yield app


def entries(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def scrape(app: FakeApp) -> Scrape:
    response = await app.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return parse(response.text)


# --- request ids ---------------------------------------------------------------------------


async def test_generated_id_is_in_header_response_id_and_engine(app: FakeApp) -> None:
    response = await app.client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]}
    )
    request_id = response.headers["x-request-id"]
    assert len(request_id) == 32 and int(request_id, 16) >= 0
    assert response.json()["id"] == f"chatcmpl-{request_id}"
    assert app.engine.requests[-1].request_id == f"chatcmpl-{request_id}"
    other = await app.client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert other.headers["x-request-id"] != request_id
    assert other.json()["id"] == "cmpl-" + other.headers["x-request-id"]


async def test_client_id_is_honoured_and_may_repeat(app: FakeApp) -> None:
    app.engine.token_interval_s = 0.01  # both requests are in the engine at once
    headers = {"X-Request-Id": "lb-0123.abc"}
    body = {"prompt": "Hi", "max_tokens": 3, "ignore_eos": True}
    first, second = await asyncio.gather(
        app.client.post("/v1/completions", json=body, headers=headers),
        app.client.post("/v1/completions", json=body, headers=headers),
    )
    for response in (first, second):
        assert response.status_code == 200, response.text
        assert response.headers["x-request-id"] == "lb-0123.abc"
        assert response.json()["id"] == "cmpl-lb-0123.abc"
    engine_ids = [r.request_id for r in app.engine.requests[-2:]]
    assert len(set(engine_ids)) == 2  # unique in the engine, still greppable
    assert all(i.startswith("cmpl-lb-0123.abc-") for i in engine_ids)


@pytest.mark.parametrize("bad_id", ["x" * 129, "two words", "a\tb", 'q"uote', "sem;i"])
async def test_unsafe_client_id_is_replaced(app: FakeApp, bad_id: str) -> None:
    response = await app.client.post(
        "/generate", json={"inputs": "Hi"}, headers={"X-Request-Id": bad_id}
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] != bad_id
    assert len(response.headers["x-request-id"]) == 32


async def test_every_response_carries_an_id(app: FakeApp) -> None:
    responses = [
        await app.client.get("/health"),
        await app.client.get("/no/such/route"),
        await app.client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": -1}),
        await app.client.post("/v1/completions", content=b"x" * (5 * 1024 * 1024)),
    ]
    assert [r.status_code for r in responses] == [200, 404, 400, 413]
    assert all(len(r.headers["x-request-id"]) == 32 for r in responses)


async def test_unexpected_error_is_a_500_with_the_id_logged(
    app: FakeApp, log_lines: io.StringIO
) -> None:
    def broken_generate(*args, **kwargs):
        raise RuntimeError("unexpected bug")

    app.engine.add_request = broken_generate  # type: ignore[method-assign]
    before = await scrape(app)
    response = await app.client.post("/v1/completions", json={"prompt": "Hi"})
    assert response.status_code == 500
    request_id = response.headers["x-request-id"]
    lines = [e for e in entries(log_lines) if e.get("request_id") == request_id]
    assert {e["logger"] for e in lines} == {"lamina.api", "lamina.access"}
    assert any("RuntimeError: unexpected bug" in e.get("exc_info", "") for e in lines)
    after = await scrape(app)
    assert diff(after, before, "lamina:request_failure_total", reason="error") == 1


# --- counters against what was returned ----------------------------------------------------


async def _stream_usage(app: FakeApp, path: str, body: dict) -> dict:
    response = await app.client.post(path, json={**body, "stream": True})
    assert response.status_code == 200
    events = [
        json.loads(line[6:])
        for line in response.text.split("\n")
        if line.startswith("data: ") and line != "data: [DONE]"
    ]
    return events[-1]


async def test_token_counters_and_histograms_match_the_usage_returned(app: FakeApp) -> None:
    before = await scrape(app)
    batch = await app.client.post(
        "/v1/completions",
        json={"prompt": ["Hello", "Good morning to you"], "n": 2, "max_tokens": 4},
    )
    chat = await app.client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]}
    )
    streamed = await _stream_usage(
        app,
        "/v1/completions",
        {"prompt": "Once", "max_tokens": 3, "stream_options": {"include_usage": True}},
    )
    tgi = await _stream_usage(app, "/generate_stream", {"inputs": "Say", "parameters": {}})
    usages = [batch.json()["usage"], chat.json()["usage"], streamed["usage"]]
    prompt_tokens = sum(u["prompt_tokens"] for u in usages) + tgi["details"]["input_length"]
    generation_tokens = sum(u["completion_tokens"] for u in usages)
    generation_tokens += tgi["details"]["generated_tokens"]
    num_prompts, num_choices = 2 + 1 + 1 + 1, 4 + 1 + 1 + 1

    after = await scrape(app)
    assert diff(after, before, "lamina:prompt_tokens_total") == prompt_tokens
    assert diff(after, before, "lamina:generation_tokens_total") == generation_tokens
    assert diff(after, before, "lamina:request_success_total") == num_choices
    assert diff(after, before, "lamina:request_success_total", finished_reason="length") == 5
    assert diff(after, before, "lamina:request_prompt_tokens_count") == num_prompts
    assert diff(after, before, "lamina:request_prompt_tokens_sum") == prompt_tokens
    assert diff(after, before, "lamina:request_generation_tokens_count") == num_choices
    assert diff(after, before, "lamina:request_generation_tokens_sum") == generation_tokens
    assert diff(after, before, "lamina:request_failure_total") == 0
    assert after.value("lamina:http_requests_in_flight") == 0
    for route in ("/v1/completions", "/v1/chat/completions", "/generate_stream"):
        assert after.value("lamina:http_requests_total", route=route, status="200") >= 1, route


async def test_each_failed_request_counts_once_with_its_reason(app: FakeApp) -> None:
    before = await scrape(app)
    post = app.client.post
    responses = [
        await post("/v1/completions", json={"prompt": "Hi", "top_p": 7}),
        await post("/v1/completions", json={"model": "nope", "prompt": "Hi"}),
        await post("/generate", content=b"{" * (5 * 1024 * 1024)),
        await post("/v1/completions", json={"prompt": "FAIL_IN_ENGINE"}),
        await post("/v1/completions", json={"prompt": "ABORT_IN_ENGINE"}),
        await app.client.get("/v1/models/nope"),  # not an inference request
    ]
    statuses = [response.status_code for response in responses]
    failed_stream = await _stream_usage(app, "/v1/completions", {"prompt": "FAIL_IN_ENGINE"})
    assert statuses == [400, 404, 413, 500, 503, 404]
    assert failed_stream["error"]["type"] == "server_error"
    after = await scrape(app)
    failures = {
        reason: diff(after, before, "lamina:request_failure_total", reason=reason)
        for reason in ("validation", "error", "aborted", "overloaded", "timeout", "unauthorized")
    }
    assert failures == {
        "validation": 3,
        "error": 2,
        "aborted": 1,
        "overloaded": 0,
        "timeout": 0,
        "unauthorized": 0,
    }
    assert diff(after, before, "lamina:request_success_total") == 0
    # Refused before routing, still counted under the route it was for.
    assert diff(after, before, "lamina:http_requests_total", route="/generate", status="413") == 1
    assert diff(after, before, "lamina:http_requests_total", status="500") == 1


async def test_in_flight_gauge_counts_open_streams(app: FakeApp) -> None:
    app.engine.token_interval_s = 0.05
    body = {"prompt": "Hi", "max_tokens": 10, "ignore_eos": True, "stream": True}
    stream = asyncio.ensure_future(app.client.post("/v1/completions", json=body))
    await asyncio.sleep(0.2)  # mid-stream: about 4 of 10 tokens out
    during = await scrape(app)
    assert (await stream).status_code == 200
    after = await scrape(app)
    assert during.value("lamina:http_requests_in_flight") == 1  # the scrape is not counted
    assert after.value("lamina:http_requests_in_flight") == 0


async def test_exposition_has_every_family_with_the_model_label(app: FakeApp) -> None:
    await app.client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    metrics = await scrape(app)
    assert metrics.types["lamina:num_requests_running"] == "gauge"
    assert metrics.types["lamina:request_success"] == "counter"
    assert metrics.types["lamina:time_to_first_token_seconds"] == "histogram"
    lamina_samples = [s for s in metrics.samples if s.name.startswith("lamina:")]
    assert lamina_samples
    assert all(s.labels.get("model_name") == app.model for s in lamina_samples)
    assert metrics.value("lamina:engine_alive") == 1  # the fake engine has no stats()
    assert not any(name.endswith("_created") for name in metrics.names())


# --- access logs ---------------------------------------------------------------------------


async def test_access_line_has_id_tokens_and_timings_but_no_text(
    app: FakeApp, log_lines: io.StringIO
) -> None:
    response = await app.client.post(
        "/v1/completions",
        json={"prompt": SECRET_PROMPT, "max_tokens": 4, "ignore_eos": True},
        headers={"X-Request-Id": "trace-42"},
    )
    usage = response.json()["usage"]
    lines = [e for e in entries(log_lines) if e.get("request_id") == "trace-42"]
    access = [e for e in lines if e["logger"] == "lamina.access"]
    assert len(access) == 1
    line = access[0]
    assert line["level"] == "info" and line["status"] == 200
    assert line["route"] == "/v1/completions" and line["method"] == "POST"
    assert line["prompt_tokens"] == usage["prompt_tokens"]
    assert line["completion_tokens"] == usage["completion_tokens"] == 4
    assert 0 < line["ttft_s"] <= line["duration_s"]
    assert line["finish_reasons"] == ["length"]
    generated = response.json()["choices"][0]["text"]
    text = log_lines.getvalue()
    assert "purple-elephant" not in text and generated not in text


async def test_probes_are_logged_at_debug(app: FakeApp, log_lines: io.StringIO) -> None:
    await app.client.get("/ready")
    await app.client.get("/v1/models")
    levels = {e["path"]: e["level"] for e in entries(log_lines) if e["logger"] == "lamina.access"}
    assert levels == {"/ready": "debug", "/v1/models": "info"}


async def test_log_prompts_puts_prompt_and_output_in_the_access_line(
    default_model_path: Path, tokenizer: Tokenizer, log_lines: io.StringIO
) -> None:
    settings = fake_settings(default_model_path, log_prompts=True)
    async with running_fake_app(settings, FakeEngine(tokenizer)) as app:
        response = await app.client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": SECRET_PROMPT}], "n": 2},
        )
    access = [e for e in entries(log_lines) if e["logger"] == "lamina.access"]
    assert len(access) == 1
    assert SECRET_PROMPT in access[0]["prompt"][0]  # the rendered chat prompt
    replies = [choice["message"]["content"] for choice in response.json()["choices"]]
    assert access[0]["output"] == replies


# --- reasons decided by admission control and deadlines (app/api/admission.py) --------------


async def test_overload_and_deadlines_count_once_with_their_reason(
    default_model_path: Path, tokenizer: Tokenizer
) -> None:
    settings = fake_settings(default_model_path, max_num_seqs=1, max_queued=0)
    engine = FakeEngine(tokenizer, token_interval_s=0.05)
    async with running_fake_app(settings, engine) as app:
        before = await scrape(app)
        body = {"prompt": "Hi", "max_tokens": 4, "ignore_eos": True}
        first, second = await asyncio.gather(
            app.client.post("/v1/completions", json=body),
            app.client.post("/v1/completions", json=body),
        )
        assert sorted([first.status_code, second.status_code]) == [200, 429]
        late = {"X-Request-Timeout": "0.12"}
        long = {**body, "max_tokens": 40}
        plain = await app.client.post("/v1/completions", json=long, headers=late)
        streamed = await app.client.post(
            "/v1/completions", json={**long, "stream": True}, headers=late
        )
        assert plain.status_code == 504
        assert streamed.status_code == 200 and "request_timeout" in streamed.text
        after = await scrape(app)
    failures = {
        reason: diff(after, before, "lamina:request_failure_total", reason=reason)
        for reason in ("overloaded", "timeout", "aborted", "error", "validation")
    }
    assert failures == {"overloaded": 1, "timeout": 2, "aborted": 0, "error": 0, "validation": 0}
    assert diff(after, before, "lamina:request_success_total") == 1
