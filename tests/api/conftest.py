"""Fixtures of the HTTP-layer tests.

- `fake_app(...)`: the real app over a FakeEngine, in-process (httpx ASGI transport).
- `threaded_fake_server`: the same app behind a real uvicorn socket, in a thread, for
  real clients and real disconnects; the fake engine stays inspectable.
- `api_server`: a real `lamina serve` process with the default model (session-wide).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from app.config import Settings
from app.main import LoadedEngine, create_app
from app.structured import ConstraintCompiler, grammar_tokenizer
from app.tokenizer import Tokenizer
from tests.api.fake_engine import FakeEngine
from tests.server_process import SERVER_POOL, engine_available, free_port, takes_servers


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def http_tokenizer(default_model_path: Path) -> Tokenizer:
    return Tokenizer(default_model_path)


def fake_settings(model_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {"model": model_path, "keepalive_interval_s": 15.0}
    values.update(overrides)
    return Settings(**values)


def fake_app_for(
    settings: Settings, engine: FakeEngine, constraints: ConstraintCompiler | None = None
) -> FastAPI:
    """The app over `engine`; `constraints` makes it compile `response_format` grammars."""
    loaded = LoadedEngine(engine, engine.tokenizer, "cpu", constraints=constraints)
    return create_app(settings, loader=lambda _s: loaded)


async def wait_until_ready(app: FastAPI, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not app.state.server.readiness.is_ready:
        if time.monotonic() > deadline:
            raise TimeoutError(f"app not ready: {app.state.server.readiness.describe()}")
        await asyncio.sleep(0.01)


@dataclass
class FakeApp:
    app: FastAPI
    client: httpx.AsyncClient
    engine: FakeEngine
    model: str


@contextlib.asynccontextmanager
async def running_fake_app(
    settings: Settings, engine: FakeEngine, constraints: ConstraintCompiler | None = None
) -> AsyncIterator[FakeApp]:
    """The app over `engine`, lifespan running and model 'loaded', with an AsyncClient."""
    app = fake_app_for(settings, engine, constraints)
    async with app.router.lifespan_context(app):
        await wait_until_ready(app)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield FakeApp(app, client, engine, settings.model_name)


@pytest.fixture
async def fake_app(default_model_path: Path, http_tokenizer: Tokenizer) -> AsyncIterator[FakeApp]:
    async with running_fake_app(
        fake_settings(default_model_path), FakeEngine(http_tokenizer)
    ) as app:
        yield app


class ThreadedServer:
    """A uvicorn server on a free port, run by a background thread."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, lifespan="on", log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return self
            time.sleep(0.05)
        raise TimeoutError("threaded server did not become ready")

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@dataclass
class LiveServer:
    """A server on a real socket, as tests see it."""

    url: str
    model: str  # the id to pass as `model`
    max_model_len: int  # its context window, from GET /v1/models
    engine: FakeEngine | None = None  # the fake server's engine, to inspect; None if real

    @property
    def is_real(self) -> bool:
        return self.engine is None


def _describe_server(url: str, engine: FakeEngine | None = None) -> LiveServer:
    card = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]
    return LiveServer(url, card["id"], card["max_model_len"], engine)


@pytest.fixture(scope="session")
def threaded_fake_server(
    default_model_path: Path, http_tokenizer: Tokenizer
) -> Iterator[LiveServer]:
    engine = FakeEngine(http_tokenizer)
    settings = fake_settings(default_model_path)
    with ThreadedServer(fake_app_for(settings, engine)) as server:
        yield _describe_server(server.url, engine)


def api_server_env(default_model_path: Path) -> dict[str, str]:
    # Crowds here test batching, not admission (tests/attack does): admission may
    # overcommit the tests' small KV cache (0.25 GiB, ~5,800 tokens) as a deployment may.
    return {"LAMINA_MODEL": str(default_model_path), "LAMINA_MAX_ADMITTED_TOKENS": "65536"}


_API_SERVER_PLANNED = pytest.StashKey[bool]()


def _planned_api_server(request: pytest.FixtureRequest, item: pytest.Item) -> list[dict[str, str]]:
    """The session's api_server, planned once: at the first test that takes it, by name or
    through live_server's real variant (which asks for it at run time, out of the
    planner's sight); so it starts first when tests/api's first real test comes first."""
    if not engine_available() or request.session.stash.get(_API_SERVER_PLANNED, False):
        return []
    request.session.stash[_API_SERVER_PLANNED] = True
    return [api_server_env(request.getfixturevalue("default_model_path"))]


def _planned_live_server(request: pytest.FixtureRequest, item: pytest.Item) -> list[dict[str, str]]:
    callspec = getattr(item, "callspec", None)
    if callspec is None or callspec.params.get("live_server") != "real":
        return []
    return _planned_api_server(request, item)


@pytest.fixture(scope="session")
@takes_servers(_planned_api_server)
def api_server(default_model_path: Path) -> Iterator[LiveServer]:
    """A real `lamina serve` with the default model, started once for the session."""
    if not engine_available():
        pytest.skip("app/engine/engine.py or app/model/runner.py is not in the tree yet")
    server = SERVER_POOL.start(api_server_env(default_model_path))
    try:
        yield _describe_server(server.url)
    finally:
        server.stop()


@pytest.fixture(params=["fake", pytest.param("real", marks=[pytest.mark.system, pytest.mark.slow])])
@takes_servers(_planned_live_server)
def live_server(request: pytest.FixtureRequest) -> LiveServer:
    """Each test using it runs twice: on the fake engine, then on the real server."""
    name = "threaded_fake_server" if request.param == "fake" else "api_server"
    return request.getfixturevalue(name)


@pytest.fixture(scope="session")
def grammar_tok(default_model_path: Path):
    tokenizer = Tokenizer(default_model_path)
    return grammar_tokenizer(default_model_path, tokenizer.vocab_size, min(tokenizer.eos_token_ids))


@pytest.fixture
async def compiling_app(
    default_model_path: Path, http_tokenizer: Tokenizer, grammar_tok
) -> AsyncIterator[FakeApp]:
    """The fake engine behind a server that compiles constraints (the app closes the
    compiler at shutdown, so each test gets its own; the tokenizer is shared)."""
    settings = fake_settings(default_model_path)
    engine = FakeEngine(http_tokenizer)
    async with running_fake_app(settings, engine, ConstraintCompiler(grammar_tok)) as app:
        yield app
