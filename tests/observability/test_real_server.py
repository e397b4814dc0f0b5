"""Metrics and logs of a real `lamina serve` process (tiny random LLaMA, tiny KV cache).

A known workload goes in; /metrics must then say exactly what the responses said:
token totals equal the usage fields, histograms hold one observation per choice (one
per token gap for inter-token latency), gauges fall back to 0, and preemptions and
prefix-cache hits move when the test forces them (the KV cache holds a few hundred
tokens, so four concurrent long requests cannot all stay resident). Logs are JSON
lines that carry the request id and, by default, no prompt text.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from tests.observability.exposition import Scrape, diff, parse
from tests.server_process import SERVER_POOL, ServerProcess, engine_available, takes_servers
from tests.system import deploy_files as deploy

pytestmark = [pytest.mark.system, pytest.mark.slow]

# The tiny model in fp32 needs 8 KiB per 16-token block: 0.0002 GiB is 26 blocks.
# Admission may overcommit the cache tenfold, so the preemption test can preempt.
TINY_ENV = {
    "LAMINA_DEVICE": "cpu",
    "LAMINA_NUM_THREADS": "1",
    "LAMINA_KV_CACHE_GB": "0.0002",
    "LAMINA_MAX_ADMITTED_TOKENS": "4160",
    "LAMINA_LOG_FORMAT": "json",
}
SECRET = "purple-elephant-7781"
T = TypeVar("T")


def eventually(check: Callable[[], T], timeout_s: float = 10.0) -> T:
    """Retry `check` until it stops raising AssertionError (engine stats lag a step)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _planned_server(request: pytest.FixtureRequest, item: pytest.Item) -> list[dict[str, str]]:
    if not engine_available():
        return []
    return [{**TINY_ENV, "LAMINA_MODEL": str(request.getfixturevalue("tiny_model_path"))}]


@pytest.fixture(scope="module")
@takes_servers(_planned_server)
def server(tiny_model_path: Path) -> Iterator[ServerProcess]:
    if not engine_available():
        pytest.skip("the engine is not in the tree")
    env = {**TINY_ENV, "LAMINA_MODEL": str(tiny_model_path)}
    with SERVER_POOL.start(env) as process:
        yield process


def scrape(server: ServerProcess) -> Scrape:
    response = httpx.get(server.url + "/metrics", timeout=10)
    assert response.status_code == 200
    return parse(response.text)


def log_entries(server: ServerProcess) -> list[dict]:
    lines = server.log_path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def assert_idle(server: ServerProcess) -> Scrape:
    metrics = scrape(server)
    for gauge in (
        "lamina:num_requests_running",
        "lamina:num_requests_waiting",
        "lamina:kv_cache_usage_perc",
        "lamina:http_requests_in_flight",
    ):
        assert metrics.value(gauge) == 0, gauge
    assert metrics.value("lamina:engine_alive") == 1
    return metrics


def sse_events(text: str) -> list[dict]:
    return [
        json.loads(line[6:])
        for line in text.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


# --- counters and histograms ---------------------------------------------------------------


def test_counters_and_histograms_match_a_known_workload(server: ServerProcess) -> None:
    before = eventually(lambda: assert_idle(server))
    url = server.url
    batch = httpx.post(
        url + "/v1/completions",
        json={"prompt": ["Hello there", "A second prompt"], "n": 2, "max_tokens": 6,
              "temperature": 0.8, "seed": 1},
        timeout=60,
    ).json()  # fmt: skip
    chat = httpx.post(
        url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5},
        timeout=60,
    ).json()
    streamed = httpx.post(
        url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Yo"}], "max_tokens": 7, "stream": True,
              "stream_options": {"include_usage": True}},
        timeout=60,
    )  # fmt: skip
    tgi = httpx.post(
        url + "/generate_stream",
        json={"inputs": "Say", "parameters": {"max_new_tokens": 4}},
        timeout=60,
    )
    tgi_details = sse_events(tgi.text)[-1]["details"]
    usages = [batch["usage"], chat["usage"], sse_events(streamed.text)[-1]["usage"]]
    prompt_tokens = sum(u["prompt_tokens"] for u in usages) + tgi_details["input_length"]
    completion_tokens = [c["completion_tokens"] for c in usages[1:]]
    completion_tokens.append(tgi_details["generated_tokens"])
    num_choices, num_prompts = 4 + 3, 2 + 3
    total_generated = usages[0]["completion_tokens"] + sum(completion_tokens)

    after = eventually(lambda: assert_idle(server))
    assert diff(after, before, "lamina:prompt_tokens_total") == prompt_tokens
    assert diff(after, before, "lamina:generation_tokens_total") == total_generated
    assert diff(after, before, "lamina:request_success_total") == num_choices
    assert diff(after, before, "lamina:request_failure_total") == 0
    assert diff(after, before, "lamina:request_prompt_tokens_count") == num_prompts
    assert diff(after, before, "lamina:request_prompt_tokens_sum") == prompt_tokens
    assert diff(after, before, "lamina:request_generation_tokens_count") == num_choices
    assert diff(after, before, "lamina:request_generation_tokens_sum") == total_generated
    for histogram in (
        "lamina:time_to_first_token_seconds",
        "lamina:e2e_request_latency_seconds",
        "lamina:request_queue_time_seconds",
        "lamina:request_prefill_time_seconds",
        "lamina:request_decode_time_seconds",
    ):
        assert diff(after, before, histogram + "_count") == num_choices, histogram
        assert diff(after, before, histogram + "_bucket", le="+Inf") == num_choices, histogram
    # One gap per token after a choice's first (no stop strings: every token is sampled).
    assert diff(after, before, "lamina:inter_token_latency_seconds_count") == (
        total_generated - num_choices
    )
    num_steps = diff(after, before, "lamina:engine_step_duration_seconds_count")
    assert num_steps == diff(after, before, "lamina:iteration_tokens_total_count")
    assert num_steps >= max(completion_tokens)
    step_tokens = diff(after, before, "lamina:iteration_tokens_total_sum")
    assert total_generated - num_choices < step_tokens <= prompt_tokens * 2 + total_generated
    e2e_sum = diff(after, before, "lamina:e2e_request_latency_seconds_sum")
    ttft_sum = diff(after, before, "lamina:time_to_first_token_seconds_sum")
    assert 0 < ttft_sum < e2e_sum


def ready_line(server: ServerProcess) -> dict:
    return next(e for e in log_entries(server) if e["message"].startswith("ready:"))


def test_preemptions_are_counted_and_every_request_still_completes(server: ServerProcess) -> None:
    before = eventually(lambda: assert_idle(server))
    # Each request fits the cache alone; four at once need twice what it holds.
    max_tokens = ready_line(server)["kv_cache_tokens"] // 2 - 16

    async def one(client: httpx.AsyncClient, i: int) -> dict:
        body = {"prompt": f"Request number {i}", "max_tokens": max_tokens, "ignore_eos": True,
                "temperature": 0}  # fmt: skip
        response = await client.post(server.url + "/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["usage"]

    async def four() -> list[dict]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(4)))

    usages = asyncio.run(four())
    assert all(u["completion_tokens"] == max_tokens for u in usages)
    after = eventually(lambda: assert_idle(server))
    assert diff(after, before, "lamina:num_preemptions_total") > 0
    assert diff(after, before, "lamina:generation_tokens_total") == 4 * max_tokens
    assert diff(after, before, "lamina:request_success_total", finished_reason="length") == 4


def test_prefix_cache_counters_move_for_a_shared_prefix(server: ServerProcess) -> None:
    before = eventually(lambda: assert_idle(server))
    shared = "The same long preamble shared by both prompts. " * 6  # several full blocks
    for tail in ("First question?", "Second question?"):
        response = httpx.post(
            server.url + "/v1/completions",
            json={"prompt": shared + tail, "max_tokens": 1},
            timeout=60,
        )
        assert response.status_code == 200
    cached = response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    after = eventually(lambda: assert_idle(server))
    hits = diff(after, before, "lamina:prefix_cache_hits_total")
    assert hits >= 32 and hits >= cached > 0
    assert diff(after, before, "lamina:prefix_cache_queries_total") >= hits


def test_a_client_that_leaves_counts_as_aborted(server: ServerProcess) -> None:
    before = eventually(lambda: assert_idle(server))
    body = {"prompt": "Hello", "max_tokens": 300, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        data = (line for line in r.iter_lines() if line.startswith("data:"))
        for _ in range(3):
            next(data)

    def aborted_and_idle() -> Scrape:
        metrics = assert_idle(server)
        assert diff(metrics, before, "lamina:request_failure_total", reason="aborted") == 1
        return metrics

    after = eventually(aborted_and_idle)
    assert diff(after, before, "lamina:request_success_total") == 0
    generated = diff(after, before, "lamina:generation_tokens_total")
    assert 3 <= generated < 300


# --- the dashboard contract and the exposition ----------------------------------------------


def test_every_metric_of_the_dashboard_and_alerts_is_exposed(server: ServerProcess) -> None:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    exposed = deploy.metric_types_from_exposition(text)
    used = deploy.metric_names_in_dashboard(deploy.load_dashboard())
    used |= deploy.metric_names_in_alert_rules(deploy.load_alert_rules())
    assert used, "no metric names found in deploy/"
    assert deploy.undefined_metric_names(used, exposed) == set()
    # And the server exposes exactly the documented set, with the documented types.
    lamina = {name: kind for name, kind in exposed.items() if name.startswith("lamina:")}
    assert lamina == deploy.DOCUMENTED_METRICS


# --- logs ----------------------------------------------------------------------------------


def _access_line(server: ServerProcess, request_id: str) -> dict:
    def find() -> dict:
        lines = [e for e in log_entries(server) if e.get("request_id") == request_id]
        access = [e for e in lines if e["logger"] == "lamina.access"]
        assert len(access) == 1, lines
        return access[0]

    return eventually(find, timeout_s=5)


def test_logs_are_json_lines_with_ids_and_without_prompt_text(server: ServerProcess) -> None:
    response = httpx.post(
        server.url + "/v1/completions",
        json={"prompt": f"{SECRET} tells a story", "max_tokens": 5},
        headers={"X-Request-Id": "obs-log-1"},
        timeout=60,
    )
    assert response.headers["x-request-id"] == "obs-log-1"
    assert response.json()["id"] == "cmpl-obs-log-1"
    access = _access_line(server, "obs-log-1")
    usage = response.json()["usage"]
    assert access["status"] == 200 and access["route"] == "/v1/completions"
    assert access["prompt_tokens"] == usage["prompt_tokens"]
    assert access["completion_tokens"] == usage["completion_tokens"]
    assert 0 < access["ttft_s"] <= access["duration_s"]
    entries = log_entries(server)  # every line parsed as JSON: nothing else was written
    assert SECRET not in server.log_path.read_text()
    loggers = {e["logger"] for e in entries}
    assert "uvicorn.error" in loggers and "uvicorn.access" not in loggers
    ready = ready_line(server)
    assert ready["device"] == "cpu" and ready["dtype"] == "float32"
    assert ready["block_size"] == 16 and ready["num_kv_blocks"] >= 8
    assert ready["kv_cache_tokens"] == ready["num_kv_blocks"] * 16
    # The context is cut to what the small cache holds; the limits are all there.
    assert ready["max_model_len"] == ready["kv_cache_tokens"]
    assert ready["max_num_seqs"] >= 1 and ready["max_prompt_tokens"] < ready["max_model_len"]


@pytest.mark.lamina_server(model="tiny_model_path", **TINY_ENV, LAMINA_LOG_PROMPTS="true")
def test_log_prompts_setting_logs_the_prompt(lamina_server: ServerProcess) -> None:
    with lamina_server as process:
        response = httpx.post(
            process.url + "/v1/completions",
            json={"prompt": f"{SECRET} tells a story", "max_tokens": 3},
            headers={"X-Request-Id": "obs-log-2"},
            timeout=60,
        )
        access = _access_line(process, "obs-log-2")
    assert access["prompt"] == [f"{SECRET} tells a story"]
    assert access["output"] == [response.json()["choices"][0]["text"]]
