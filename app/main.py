"""Composition root: the FastAPI app, its lifespan, and `serve` (run by `lamina serve`).

The lifespan starts loading the model in a worker thread and returns at once, so
/health answers during start-up while /ready says 503. When loading and warm-up end,
the engine thread starts and the server turns ready. This is the only module of the
HTTP side that knows about the model runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app import __version__
from app.api.admission import AdmissionCollector
from app.api.auth import ApiKeyAuth
from app.api.debug_hooks import install_test_hooks
from app.api.engine_client import EngineClient
from app.api.errors import install_error_handlers
from app.api.head import HeadAsGet
from app.api.middleware import BodyGuard
from app.api.observability import install_observability
from app.api.openapi import install_openapi
from app.api.response_store import ResponseStore
from app.api.routes import embeddings_router, openai_router, tgi_router
from app.api.routes_misc import health_router, worker_router
from app.api.routes_misc import router as misc_router
from app.api.routes_responses import responses_router
from app.api.state import Limits, ModelInfo, ServerState, Serving
from app.api.status import router as status_router
from app.config import Settings
from app.logging_setup import configure_logging
from app.metrics import Metrics
from app.structured import ConstraintCompiler, grammar_tokenizer
from app.tokenizer import Tokenizer
from app.ui import UiPages
from app.weights_source import ModelSourceError

logger = logging.getLogger("lamina")

DESCRIPTION = (
    "OpenAI-compatible (/v1/completions, /v1/chat/completions, /v1/models) and "
    "TGI-compatible (/generate, /generate_stream, /info) text generation. Errors always "
    'use the envelope {"error": {"message", "type", "param", "code"}}.'
)


@dataclass
class LoadedEngine:
    """What loading produces: an engine not yet started, and the HTTP layer's tokenizer."""

    engine: EngineClient
    tokenizer: Tokenizer
    device: str | None = None
    dtype: str | None = None
    # Tokens one sequence can hold in the KV cache; requests are limited to the smaller
    # of this and the engine's max_model_len, so a request that cannot fit is a 400.
    max_tokens_in_cache: int | None = None
    # Compiles `response_format` grammars; None: the engine cannot apply them (a 400).
    constraints: ConstraintCompiler | None = None
    # config.json's model_type and architectures, for /model_info (routers read them).
    model_type: str | None = None
    architectures: tuple[str, ...] = ()
    # Which kernels compute the model, in words (GET /status); None: the runner does not say.
    kernels: dict[str, str] | None = None


EngineLoader = Callable[[Settings], LoadedEngine]  # blocking: runs in a worker thread


def _describe(value: Any) -> str | None:
    return None if value is None else str(value).removeprefix("torch.")


def load_engine(settings: Settings) -> LoadedEngine:
    """Load weights, size the KV cache, warm up, build the engine (blocking, seconds)."""
    from app.engine.engine import Engine
    from app.model.config import read_config_json
    from app.model.families import read_model_config
    from app.model.runner import ModelRunner

    for line in settings.ignored_settings():
        logger.warning(line)
    settings = settings.with_model_folder()  # a .gguf or hub id becomes a local folder
    read_model_config(settings.model)  # a model lamina cannot run is refused before anything
    if settings.speculative == "draft":  # and so is a draft model, made a folder once
        from app.model.draft import read_draft_config

        draft_folder, _ = read_draft_config(settings.speculative_model)
        settings = settings.model_copy(update={"speculative_model": draft_folder})
    raw_config = read_config_json(settings.model)
    http_tokenizer = Tokenizer(
        settings.model, settings.chat_control_tokens, settings.tool_call_format
    )
    runner = ModelRunner.from_settings(settings)
    if settings.warmup:
        runner.warmup()
    runner.log_memory()
    engine = Engine(runner, Tokenizer(settings.model), settings)
    # Masks as wide as the logits; EOS (the lowest id if several) where the grammar accepts.
    eos = min(http_tokenizer.eos_token_ids)
    compiler = ConstraintCompiler(grammar_tokenizer(settings.model, runner.config.vocab_size, eos))
    return LoadedEngine(
        engine=engine,
        tokenizer=http_tokenizer,
        device=_describe(getattr(runner, "device", None)),
        dtype=_describe(getattr(runner, "dtype", None)),
        max_tokens_in_cache=runner.num_blocks * runner.block_size,
        constraints=compiler,
        model_type=raw_config.get("model_type"),
        architectures=tuple(raw_config.get("architectures") or ()),
        kernels=runner.kernel_summary(),
    )


async def _run_in_passing_thread(
    fn: Callable[[Settings], LoadedEngine], settings: Settings
) -> LoadedEngine:
    """fn(settings) in a thread of its own that ends with it, not in asyncio's executor.

    Why: loading runs torch's OpenMP parallel regions, and the thread that runs them keeps
    a pool of OpenMP workers for as long as it lives. An executor thread lives forever, so
    the engine thread's own pool would come second, and with more OpenMP threads than
    cores, libgomp's idle workers stop spinning and go to sleep between the hundreds of
    small parallel regions of a decode step: a single stream decoded at 20 instead of 27
    tokens/s on 2 cores (docs/performance-http.md, "Where the engine thread's cores went").
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[LoadedEngine] = loop.create_future()

    def settle(result: LoadedEngine | None, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def work() -> None:
        try:
            outcome = (fn(settings), None)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            outcome = (None, exc)
        with contextlib.suppress(RuntimeError):  # the loop closed: shutting down anyway
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=work, name="lamina-load", daemon=True).start()
    return await done


def _freeze_heap() -> None:
    """Everything loading created (modules, tokenizer tables, ~400k objects) lives as long
    as the process; freezing it keeps a full collection, which holds the GIL and so stalls
    every stream, from walking it again (~170 ms measured, docs/performance-http.md).
    Only for a server process: frozen objects are never collected, so an app created and
    dropped in a test process would leak."""
    gc.collect()
    gc.freeze()


def _is_model_refusal(exc: BaseException) -> bool:
    """Whether loading failed because LAMINA_MODEL names nothing lamina can load
    (ModelSourceError) or a model it cannot run (app.model.config.ModelLoadError; only
    looked up once that module was loaded)."""
    if isinstance(exc, ModelSourceError):
        return True
    config = sys.modules.get("app.model.config")
    return config is not None and isinstance(exc, config.ModelLoadError)


async def _bring_up(
    state: ServerState,
    loader: EngineLoader,
    on_fatal: Callable[[str], None] | None,
    freeze_heap: bool,
) -> None:
    settings = state.settings
    started = time.monotonic()
    try:
        loaded = await _run_in_passing_thread(loader, settings)
        loaded.engine.start()
    except Exception as exc:
        if _is_model_refusal(exc):  # the reason is the whole story: no traceback
            logger.error("cannot serve %s: %s", settings.model, exc)
        else:
            logger.exception("loading the model from %s failed", settings.model)
        reason = f"{type(exc).__name__}: {exc}"
        state.readiness.fail(reason)
        if on_fatal is not None:
            on_fatal(reason)
        return
    max_model_len = loaded.engine.max_model_len
    if loaded.max_tokens_in_cache is not None and loaded.max_tokens_in_cache < max_model_len:
        logger.warning(
            "limiting requests to %d tokens, what the KV cache holds (max_model_len is %d)",
            loaded.max_tokens_in_cache,
            max_model_len,
        )
        max_model_len = loaded.max_tokens_in_cache
    state.admission.watch_backlog(loaded.engine)
    state.admission.size_token_budget(loaded.max_tokens_in_cache)
    state.serving = Serving(
        engine=loaded.engine,
        tokenizer=loaded.tokenizer,
        model=ModelInfo(
            name=settings.model_name,
            path=str(settings.model),
            max_model_len=max_model_len,
            device=loaded.device,
            dtype=loaded.dtype,
            created=int(time.time()),
            model_type=loaded.model_type,
            architectures=loaded.architectures,
            kernels=loaded.kernels,
        ),
        limits=Limits(settings, max_model_len, loaded.tokenizer.vocab_size),
        constraints=loaded.constraints,
        responses=ResponseStore(
            settings.responses_store_max_entries, settings.responses_store_ttl_s
        ),
    )
    if freeze_heap:
        _freeze_heap()
    state.readiness.set_ready()
    log_ready(state.serving, settings, loaded.max_tokens_in_cache, time.monotonic() - started)


def log_ready(serving: Serving, settings: Settings, kv_cache_tokens: int | None, startup_s: float):
    """The start-up line: which model, device, dtype, KV cache and limits were chosen."""
    model, limits = serving.model, serving.limits
    num_blocks = None if kv_cache_tokens is None else kv_cache_tokens // settings.block_size
    logger.info(
        "ready: %s on %s (%s), context %d tokens, KV cache %s blocks of %d tokens, after %.1f s",
        model.name,
        model.device,
        model.dtype,
        model.max_model_len,
        num_blocks,
        settings.block_size,
        startup_s,
        extra={
            "model": model.name,
            "model_path": model.path,
            "device": model.device,
            "dtype": model.dtype,
            "max_model_len": model.max_model_len,
            "num_kv_blocks": num_blocks,
            "block_size": settings.block_size,
            "kv_cache_tokens": kv_cache_tokens,
            "max_num_seqs": settings.max_num_seqs,
            "max_num_batched_tokens": settings.max_num_batched_tokens,
            "max_queued": settings.max_queued,
            "max_prompt_tokens": limits.max_prompt_tokens,
            "max_tokens_limit": settings.max_tokens_limit,
            "max_n": settings.max_n,
            "prefix_caching": settings.enable_prefix_caching,
            "startup_s": round(startup_s, 3),
        },
    )


def _make_lifespan(
    state: ServerState,
    loader: EngineLoader,
    on_fatal: Callable[[str], None] | None,
    freeze_heap: bool,
) -> Callable[[FastAPI], Any]:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        bring_up = asyncio.create_task(_bring_up(state, loader, on_fatal, freeze_heap))
        try:
            yield
        finally:
            state.readiness.start_draining()
            bring_up.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await bring_up
            if state.serving is not None:
                await asyncio.to_thread(state.serving.engine.shutdown)
                if state.serving.constraints is not None:
                    state.serving.constraints.close()

    return lifespan


def create_app(
    settings: Settings,
    *,
    loader: EngineLoader = load_engine,
    on_fatal: Callable[[str], None] | None = None,
    freeze_heap: bool = False,
) -> FastAPI:
    """The lamina ASGI app. `loader` builds the engine (tests pass a fake one);
    `on_fatal` is called when loading fails, so the process can exit non-zero;
    `freeze_heap` (server processes) moves what loading created out of the collector's
    reach once the engine is ready."""
    state = ServerState(settings=settings)
    metrics = Metrics(settings.model_name)
    metrics.registry.register(AdmissionCollector(settings.model_name, state.admission))

    def load_and_observe(s: Settings) -> LoadedEngine:
        loaded = loader(s)
        metrics.attach_engine(loaded.engine)  # step observer + scrape-time stats()
        return loaded

    app = FastAPI(
        title="lamina",
        version=__version__,
        description=DESCRIPTION,
        lifespan=_make_lifespan(state, load_and_observe, on_fatal, freeze_heap),
        strict_content_type=False,  # a body without Content-Type is read as JSON
    )
    app.state.server = state
    install_error_handlers(app)
    for router in (
        health_router,
        status_router,
        openai_router,
        responses_router,
        embeddings_router,
        tgi_router,
        misc_router,
        worker_router,
    ):
        app.include_router(router)
    install_test_hooks(app, settings)
    install_openapi(app)
    app.add_middleware(BodyGuard, max_body_bytes=settings.max_body_bytes)
    # Outside the body limit (no body is read for a bad key), inside CORS (401s and
    # preflights carry CORS headers).
    app.add_middleware(ApiKeyAuth, api_keys=settings.api_keys, open_routes=settings.open_routes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
        )
    if settings.ui:  # outside the key check: the pages must load to ask for the key
        app.add_middleware(UiPages)
    # Outside the rest, which then see the GET; inside observability, which logs HEAD.
    app.add_middleware(HeadAsGet, router=app.router)
    install_observability(app, settings, metrics)  # last: its middleware is the outermost
    return app


def serve(settings: Settings) -> int:
    """Run the server until SIGINT/SIGTERM. Returns the process exit status."""
    import uvicorn

    from app.server.draining import DrainingServer
    from app.server.uvicorn_config import uvicorn_config

    configure_logging(settings.log_format, settings.log_level)
    logger.info(
        "starting lamina %s: loading %s (device %s, dtype %s) for %s:%d",
        __version__, settings.model, settings.device, settings.dtype, settings.host, settings.port,
    )  # fmt: skip
    failures: list[str] = []
    servers: list[uvicorn.Server] = []

    def on_fatal(reason: str) -> None:
        failures.append(reason)
        for server in servers:
            server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal, freeze_heap=True)
    config = uvicorn_config(app, settings)
    server = DrainingServer(config, app.state.server)  # SIGTERM: drain, then exit 0
    servers.append(server)
    server.run()
    if failures:
        logger.error("exiting: %s", failures[0])
        return 1
    return 0
