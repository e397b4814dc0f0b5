"""Delta delivery: one socket write per engine step, and an engine that never waits for
the event loop. The real app, Engine and tokenizer over a SleepRunner (no model)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from app.core import SamplingParams
from app.engine.engine import Engine
from app.main import LoadedEngine, create_app
from app.tokenizer import Tokenizer
from tests.perf_http.sleep_runner import SAMPLE_TEXT, SleepRunner

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def frozen_heap():
    """The heap frozen as a server freezes it at ready (app.main._freeze_heap), undone
    after. This test process holds the whole suite's objects (millions); a full
    collection of them holds the GIL for a second or more on 2 cores (measured with a
    gc.callbacks probe), and one falling inside a timing window stalls the engine thread
    for all of it, as it never does in a server. Frozen, a collection walks only what
    was allocated since."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="module")
def tokenizer(default_model_path: Path) -> Tokenizer:
    return Tokenizer(default_model_path)


def sleep_runner(tokenizer: Tokenizer, step_s: float) -> SleepRunner:
    return SleepRunner(tokenizer.encode(SAMPLE_TEXT, add_special_tokens=False), fixed_s=step_s)


class BodyRecorder:
    """ASGI wrapper that keeps every non-empty response body message: one per send()."""

    def __init__(self, app) -> None:  # noqa: ANN001 - any ASGI app
        self.app = app
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        async def recording_send(message) -> None:  # noqa: ANN001
            if message["type"] == "http.response.body" and message.get("body"):
                self.bodies.append(bytes(message["body"]))
            await send(message)

        await self.app(scope, receive, recording_send)


async def running_app(settings: Settings, runner: SleepRunner, tokenizer: Tokenizer):
    engine = Engine(runner, tokenizer, settings)
    app = create_app(settings, loader=lambda _s: LoadedEngine(engine, tokenizer, "cpu"))
    return app, engine


@contextlib.asynccontextmanager
async def ready_client(app, recorder: BodyRecorder) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        deadline = time.monotonic() + 20
        while not app.state.server.readiness.is_ready:
            assert time.monotonic() < deadline, "app did not become ready"
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=recorder)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


def frames_of(body: bytes) -> list[bytes]:
    assert body.endswith(b"\n\n"), "a write must end on a frame boundary"
    return [frame for frame in body.split(b"\n\n") if frame]


async def test_each_engine_step_is_one_write_and_the_last_carries_done(
    default_model_path: Path, tokenizer: Tokenizer
):
    num_choices, num_tokens = 4, 12
    settings = Settings(model=default_model_path, warmup=False)
    runner = sleep_runner(tokenizer, step_s=0.002)
    app, _ = await running_app(settings, runner, tokenizer)
    recorder = BodyRecorder(app)
    body = {
        "prompt": "Once upon a time",
        "max_tokens": num_tokens,
        "n": num_choices,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with ready_client(app, recorder) as client:
        response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200
    writes = [frames_of(body) for body in recorder.bodies]
    events = [json.loads(f[6:]) for w in writes for f in w if f != b"data: [DONE]"]
    token_events = [e for e in events if e["choices"]]
    assert sum(1 for e in token_events if e["choices"][0]["text"]) == num_choices * num_tokens
    assert events[-1]["usage"]["completion_tokens"] == num_choices * num_tokens
    # The n choices decode in lockstep: their tokens of one step share one write.
    assert max(len(w) for w in writes) >= num_choices
    assert len(writes) <= runner.num_steps + 1
    last = writes[-1]
    assert last[-1] == b"data: [DONE]"
    assert any(b'"finish_reason":"length"' in frame for frame in last)


async def test_the_engine_keeps_stepping_while_the_event_loop_is_blocked(
    default_model_path: Path, tokenizer: Tokenizer, frozen_heap: None
):
    settings = Settings(model=default_model_path, warmup=False)
    runner = sleep_runner(tokenizer, step_s=0.001)
    engine = Engine(runner, tokenizer, settings)
    engine.start()
    try:
        num_tokens = 400
        params = SamplingParams(max_tokens=num_tokens, ignore_eos=True, temperature=0.0)
        stream = engine.add_request("r", tokenizer.encode("Hello"), params)
        first = await stream.__anext__()
        steps_before = runner.num_steps
        time.sleep(0.3)  # the loop is stuck; deliveries pile up as queued callbacks
        steps_during = runner.num_steps - steps_before
        assert steps_during >= 10, f"the engine stepped only {steps_during} times"
        received = len(first.token_ids)
        async for delta in stream:
            received += len(delta.token_ids)
        assert received == num_tokens
    finally:
        engine.shutdown()
