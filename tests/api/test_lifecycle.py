"""Start-up, readiness, liveness, a dead engine and a failed model load."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading

import httpx
import pytest

from app.main import LoadedEngine, create_app
from tests.api.conftest import fake_settings, running_fake_app
from tests.api.fake_engine import FakeEngine
from tests.observability.exposition import diff, parse
from tests.server_process import REPO_ROOT, ServerProcess

pytestmark = pytest.mark.anyio

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


async def test_health_answers_while_loading_and_ready_waits(
    default_model_path, http_tokenizer
) -> None:
    release = threading.Event()
    engine = FakeEngine(http_tokenizer)

    def slow_loader(_settings):
        release.wait(10)
        return LoadedEngine(engine, http_tokenizer)

    app = create_app(fake_settings(default_model_path), loader=slow_loader)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
    ):
        assert (await client.get("/health")).json() == {"status": "ok"}
        not_ready = await client.get("/ready")
        assert not_ready.status_code == 503
        assert not_ready.json()["error"]["code"] == "server_loading"
        busy = await client.post("/v1/chat/completions", json=CHAT)
        assert busy.status_code == 503 and "loading" in busy.json()["error"]["message"]
        release.set()
        for _ in range(200):
            if (await client.get("/ready")).status_code == 200:
                break
            await asyncio.sleep(0.01)
        assert (await client.get("/ready")).json() == {"status": "ready"}
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
    assert not engine.alive  # the lifespan shut the engine down


async def test_failed_load_is_reported_and_fatal(default_model_path) -> None:
    reasons: list[str] = []

    def broken_loader(_settings):
        raise FileNotFoundError("no weights here")

    app = create_app(
        fake_settings(default_model_path), loader=broken_loader, on_fatal=reasons.append
    )
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
    ):
        for _ in range(200):
            if reasons:
                break
            await asyncio.sleep(0.01)
        assert reasons == ["FileNotFoundError: no weights here"]
        ready = await client.get("/ready")
        assert ready.status_code == 503 and "no weights here" in ready.json()["error"]["message"]
        assert (await client.get("/health")).status_code == 503


async def test_dead_engine_means_503_everywhere(default_model_path, http_tokenizer) -> None:
    engine = FakeEngine(http_tokenizer)
    async with running_fake_app(fake_settings(default_model_path), engine) as fake:
        client = fake.client
        engine.alive = False
        assert (await client.get("/health")).status_code == 503
        assert (await client.get("/ready")).status_code == 503
        for stream in (False, True):
            response = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "engine_dead"


async def test_draining_refuses_new_work(default_model_path, http_tokenizer) -> None:
    engine = FakeEngine(http_tokenizer)
    async with running_fake_app(fake_settings(default_model_path), engine) as fake:
        client = fake.client
        fake.app.state.server.readiness.start_draining()
        ready = await client.get("/ready")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "server_draining"
        assert (await client.post("/generate", json={"inputs": "Hi"})).status_code == 503
        assert (await client.get("/health")).status_code == 200


@pytest.mark.system
def test_serve_exits_non_zero_when_the_model_cannot_load(tmp_path) -> None:
    server = ServerProcess(extra_env={"LAMINA_MODEL": str(tmp_path / "missing")})
    with pytest.raises(RuntimeError, match="exited with 1"):
        server.start(ready_timeout_s=120)


def test_http_layer_imports_no_torch_and_no_model_code() -> None:
    code = (
        "import sys, app.main, app.api.routes, app.api.routes_misc;"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('app.model')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for path in (REPO_ROOT / "app/api").glob("*.py"):
        source = path.read_text()
        assert "import torch" not in source and "app.model" not in source, path.name


async def test_expected_503s_are_not_logged_or_counted_as_errors(
    default_model_path, http_tokenizer, caplog
) -> None:
    """A 503 while draining is the server doing its job (info, reason `unavailable`);
    a 503 because the engine died is a breakage (warning, reason `error`)."""
    engine = FakeEngine(http_tokenizer)
    async with running_fake_app(fake_settings(default_model_path), engine) as fake:
        client = fake.client
        before = parse((await client.get("/metrics")).text)
        caplog.set_level(logging.INFO, logger="lamina.access")
        engine.alive = False
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 503
        fake.app.state.server.readiness.start_draining()
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 503
        after = parse((await client.get("/metrics")).text)
    access = [r for r in caplog.records if r.name == "lamina.access" and r.status == 503]
    assert [(r.levelno, r.failure) for r in access] == [
        (logging.WARNING, "error"),
        (logging.INFO, "unavailable"),
    ]
    for reason in ("unavailable", "error"):
        assert diff(after, before, "lamina:request_failure_total", reason=reason) == 1


async def test_the_model_loads_in_a_thread_that_ends_with_loading(
    default_model_path, http_tokenizer
) -> None:
    """torch's OpenMP workers belong to the thread that ran the parallel work; a loader
    thread that lived on would leave the engine thread's workers starved of cores."""
    threads: list[threading.Thread] = []

    def recording_loader(_settings):
        threads.append(threading.current_thread())
        return LoadedEngine(FakeEngine(http_tokenizer), http_tokenizer)

    app = create_app(fake_settings(default_model_path), loader=recording_loader)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
    ):
        for _ in range(200):
            if (await client.get("/ready")).status_code == 200:
                break
            await asyncio.sleep(0.01)
        assert (await client.get("/ready")).status_code == 200
        (loader_thread,) = threads
        loader_thread.join(5)
        assert loader_thread.name == "lamina-load" and not loader_thread.is_alive()
