"""Server state shared by the routes: readiness phase and the loaded engine.

One `ServerState` lives on `app.state.server`. It starts in the LOADING phase with no
engine; the lifespan task fills `engine` and `tokenizer` and moves to READY. Shutdown
moves it to DRAINING. Routes reach it through `StateDep` and `ServingDep` (the gate of
the model routes: 503 until the model is loaded and while draining); the generation
routes pass their own gate, routes.admit, which also admits them.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Annotated, Protocol

from fastapi import Depends, Request

from app.api.admission import AdmissionController
from app.api.auth import key_priorities
from app.api.engine_client import EngineClient
from app.api.errors import APIError, model_not_found, service_unavailable
from app.api.request_record import RequestRecord
from app.api.response_store import ResponseStore
from app.config import Settings
from app.structured import ConstraintCompiler
from app.tokenizer import Tokenizer


class Phase(str, enum.Enum):
    LOADING = "loading"  # weights loading / warming up: /ready says 503
    READY = "ready"  # serving
    DRAINING = "draining"  # shutting down: finish in-flight work, refuse new work
    FAILED = "failed"  # the model could not be loaded: the process is about to exit


class Readiness:
    """The server's lifecycle phase. Only moves forward: loading -> ready -> draining."""

    def __init__(self) -> None:
        self.phase = Phase.LOADING
        self.failure: str | None = None

    @property
    def is_ready(self) -> bool:
        return self.phase is Phase.READY

    def set_ready(self) -> None:
        if self.phase is Phase.LOADING:
            self.phase = Phase.READY

    def start_draining(self) -> None:
        if self.phase is not Phase.FAILED:
            self.phase = Phase.DRAINING

    def fail(self, reason: str) -> None:
        self.phase = Phase.FAILED
        self.failure = reason

    def describe(self) -> str:
        """A sentence for a 503 body: why this server does not take requests now."""
        if self.phase is Phase.LOADING:
            return "the model is still loading; retry when GET /ready answers 200"
        if self.phase is Phase.DRAINING:
            return "the server is shutting down and accepts no new requests"
        if self.phase is Phase.FAILED:
            return f"the model failed to load: {self.failure}"
        return "ready"


# Names clients send when they address a server by URL rather than by model:
# huggingface_hub's InferenceClient(base_url=...) sends "dummy"; TGI's docs use "tgi".
PLACEHOLDER_MODEL_NAMES = frozenset({"dummy", "tgi"})


@dataclass(frozen=True)
class ModelInfo:
    """What /v1/models and /info report about the served model."""

    name: str  # the id clients pass as `model`
    path: str  # the local folder it was loaded from
    max_model_len: int  # context window in tokens
    device: str | None = None  # e.g. "cpu", "cuda:0"; None when the runner does not say
    dtype: str | None = None  # e.g. "float32"
    created: int = 0  # unix time the server loaded it
    model_type: str | None = None  # config.json's model_type, e.g. "llama"
    architectures: tuple[str, ...] = ()  # config.json's architectures
    kernels: dict[str, str] | None = None  # which kernels compute it, in words (GET /status)

    def check_named(self, requested: str | None) -> None:
        """An absent (or placeholder) model means this one; any other name is a 404."""
        named = requested is not None and requested not in PLACEHOLDER_MODEL_NAMES
        if named and requested != self.name:
            raise model_not_found(requested, self.name)


@dataclass(frozen=True)
class Limits:
    """Per-request limits: the settings' (LAMINA_MAX_N, ...) and the loaded model's."""

    settings: Settings
    max_model_len: int  # context window: prompt + output tokens
    vocab_size: int

    @property
    def max_prompt_tokens(self) -> int:
        """At most the context window minus one: a token must fit after the prompt."""
        configured = self.settings.max_prompt_tokens
        return min(self.max_model_len - 1, configured or self.max_model_len)


class Stoppable(Protocol):
    """What the drain stops: the route driver's run of one request (driver.Run)."""

    def stop(self, error: APIError) -> None: ...


@dataclass(frozen=True)
class Serving:
    """What generation routes use once the model is up. Built once, when loading ends."""

    engine: EngineClient
    tokenizer: Tokenizer  # the HTTP layer's own instance, used on the event-loop thread only
    model: ModelInfo
    limits: Limits
    # Stored responses of /v1/responses (`store`), in this process's memory.
    responses: ResponseStore
    runs: set[Stoppable] = field(default_factory=set)  # generation requests running now
    # Compiles `response_format` grammars for the model's tokenizer (thread-safe, cached);
    # None when the engine cannot apply constraints: such requests are then a 400.
    constraints: ConstraintCompiler | None = None


@dataclass
class ServerState:
    """Lives on `app.state.server`. `serving` is None until the model is loaded."""

    settings: Settings
    readiness: Readiness = field(default_factory=Readiness)
    serving: Serving | None = None
    admission: AdmissionController = field(init=False)  # generation requests in flight
    started_monotonic: float = field(default_factory=time.monotonic)  # for GET /status uptime
    # routes.client_of's id of a key -> the priority LAMINA_API_KEYS gives it (`key:N`)
    key_priorities: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.admission = AdmissionController.from_settings(self.settings)
        self.key_priorities = key_priorities(self.settings.api_keys)


def serving_or_503(state: ServerState, record: RequestRecord) -> Serving:
    """The loaded model and engine, or a 503 saying why there are none right now."""
    if not state.readiness.is_ready or state.serving is None:
        # Loading or draining: the server doing its job, not an error (log_access: no warning).
        record.fail("unavailable")
        raise service_unavailable(
            state.readiness.describe(), code=f"server_{state.readiness.phase.value}"
        )
    return state.serving


# Both dependencies are `async def` although they never wait: FastAPI runs a plain
# `def` dependency in its thread pool, two thread hops per request for a lookup.
async def get_state(request: Request) -> ServerState:
    return request.app.state.server


async def get_serving(request: Request) -> Serving:
    return serving_or_503(request.app.state.server, RequestRecord.of(request))


ServingDep = Annotated[Serving, Depends(get_serving)]
StateDep = Annotated[ServerState, Depends(get_state)]
