"""Engine-thread log lines about a request carry its `request_id` field, like HTTP lines.

The engine's own id for a request may differ from the HTTP request id (a prefix such as
`cmpl-`, a suffix when the client chose the id), so the engine keeps the HTTP id that
was current when the request was submitted and logs it as `request_id`, with its own id
as `engine_request_id`. Over the fake runner and tokenizer: milliseconds.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from app.config import load_settings
from app.core import FinishReason, SamplingParams
from app.engine.engine import Engine
from app.engine.engine_core import EngineCore
from app.logging_setup import make_handler, request_id_var
from tests.unit.fakes import FakeRunner, FakeTokenizer

TOK = FakeTokenizer()
PARAMS = SamplingParams(max_tokens=4, temperature=0.0)


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """lamina.engine's lines, through the process's JSON handler (with its filter)."""
    buffer = io.StringIO()
    handler = make_handler("json", buffer)
    logger = logging.getLogger("lamina.engine")
    logger.addHandler(handler)
    try:
        yield buffer
    finally:
        logger.removeHandler(handler)


def lines_about(buffer: io.StringIO, engine_id: str) -> list[dict]:
    entries = [json.loads(line) for line in buffer.getvalue().splitlines()]
    return [e for e in entries if e["message"].endswith(f"for request {engine_id}")]


def make_core(**overrides) -> EngineCore:
    runner = FakeRunner(
        block_size=4, num_blocks=64, max_model_len=256, fail_token_id=TOK.encode("!")[0]
    )
    settings = load_settings(environ={}, fault_injection_marker="BOOM", **overrides)
    return EngineCore(runner, TOK, settings)


def run_to_end(core: EngineCore) -> dict[str, FinishReason]:
    finals: dict[str, FinishReason] = {}
    while core.has_unfinished():
        for delta in core.step():
            if delta.finished:
                finals[delta.request_id] = delta.finish_reason
    return finals


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        ({"bad": "BOOM"}, "postprocessing failed"),  # the injected fault
        ({"bad": "fails!"}, "engine step failed"),  # the runner raises, bad alone in the batch
        ({"bad": "fails!", "good": "works"}, "engine step failed"),  # isolated from the batch
    ],
)
def test_a_fault_line_carries_the_request_id_field(json_lines, prompts, message):
    core = make_core()
    # A different id in this context: the filter must not replace the line's own.
    token = request_id_var.set("unrelated-http-request")
    try:
        for name, prompt in prompts.items():
            log_id = "trace-42" if name == "bad" else None
            engine_id = f"cmpl-{name}-1a2b"
            assert (
                core.add_request(engine_id, TOK.encode(prompt), PARAMS, log_request_id=log_id) == []
            )
        finals = run_to_end(core)
    finally:
        request_id_var.reset(token)
    assert finals.pop("cmpl-bad-1a2b") is FinishReason.ERROR
    assert all(reason is FinishReason.LENGTH for reason in finals.values())
    [line] = lines_about(json_lines, "cmpl-bad-1a2b")
    assert line["message"].startswith(message)
    assert line["request_id"] == "trace-42"
    assert line["engine_request_id"] == "cmpl-bad-1a2b"
    assert "exc_info" in line
    assert lines_about(json_lines, "cmpl-good-1a2b") == []


def test_without_an_http_request_the_field_is_the_engine_id(json_lines):
    core = make_core()
    assert core.add_request("bench-7", TOK.encode("BOOM"), PARAMS) == []
    assert run_to_end(core) == {"bench-7": FinishReason.ERROR}
    [line] = lines_about(json_lines, "bench-7")
    assert line["request_id"] == "bench-7" and line["engine_request_id"] == "bench-7"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_the_engine_thread_logs_the_submitting_http_request_id(json_lines):
    runner = FakeRunner(block_size=4, num_blocks=64, max_model_len=256)
    engine = Engine(runner, TOK, load_settings(environ={}, fault_injection_marker="BOOM"))
    engine.start()
    try:
        stream = engine.add_request(
            "cmpl-trace-42-9f8e", TOK.encode("BOOM"), PARAMS, log_request_id="trace-42"
        )
        final = [delta async for delta in stream][-1]
        assert final.finish_reason is FinishReason.ERROR
    finally:
        engine.shutdown()
    # Logged on the engine thread, where the context variable is unset.
    [line] = lines_about(json_lines, "cmpl-trace-42-9f8e")
    assert line["logger"] == "lamina.engine" and line["level"] == "error"
    assert line["request_id"] == "trace-42"
    assert line["engine_request_id"] == "cmpl-trace-42-9f8e"
