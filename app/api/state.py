"""Server state shared by the routes: readiness phase and the loaded engine.

One `ServerState` lives on `app.state.server`. It starts in the LOADING phase with no
engine; the lifespan task fills `engine` and `tokenizer` and moves to READY. Shutdown
moves it to DRAINING. Routes reach it through the dependencies in `deps.py`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from app.api.admission import AdmissionController
from app.api.engine_client import EngineClient
from app.config import Settings
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


@dataclass(frozen=True)
class ModelInfo:
    """What /v1/models and /info report about the served model."""

    name: str  # the id clients pass as `model`
    path: str  # the local folder it was loaded from
    max_model_len: int  # context window in tokens
    device: str | None = None  # e.g. "cpu", "cuda:0"; None when the runner does not say
    dtype: str | None = None  # e.g. "float32"
    created: int = 0  # unix time the server loaded it


DEFAULT_MAX_PROMPTS = 32


@dataclass(frozen=True)
class Limits:
    """Per-request limits, resolved once the model is loaded (some come from the model)."""

    max_model_len: int  # context window: prompt + output tokens
    max_prompt_tokens: int  # <= max_model_len - 1
    max_tokens_limit: int | None  # cap on max_tokens; None: the context window is the cap
    max_n: int
    max_stop_sequences: int
    max_stop_length: int  # characters
    max_logit_bias: int  # entries
    max_top_logprobs: int
    vocab_size: int
    max_prompts: int = DEFAULT_MAX_PROMPTS  # prompts in one /v1/completions request

    @classmethod
    def from_settings(cls, settings: Settings, max_model_len: int, vocab_size: int) -> Limits:
        max_prompt = max_model_len - 1  # at least one token must fit after the prompt
        if settings.max_prompt_tokens is not None:
            max_prompt = min(max_prompt, settings.max_prompt_tokens)
        return cls(
            max_model_len=max_model_len,
            max_prompt_tokens=max_prompt,
            max_tokens_limit=settings.max_tokens_limit,
            max_n=settings.max_n,
            max_stop_sequences=settings.max_stop_sequences,
            max_stop_length=settings.max_stop_length,
            max_logit_bias=settings.max_logit_bias,
            max_top_logprobs=settings.max_top_logprobs,
            vocab_size=vocab_size,
            # TODO(config): a Settings field `max_prompts_per_request` is requested.
            max_prompts=settings.max_prompts_per_request,
        )


@dataclass(frozen=True)
class Serving:
    """What generation routes use once the model is up. Built once, when loading ends."""

    engine: EngineClient
    tokenizer: Tokenizer  # the HTTP layer's own instance, used on the event-loop thread only
    model: ModelInfo
    limits: Limits
    keepalive_interval_s: float


@dataclass
class ServerState:
    """Lives on `app.state.server`. `serving` is None until the model is loaded."""

    settings: Settings
    readiness: Readiness = field(default_factory=Readiness)
    serving: Serving | None = None
    admission: AdmissionController = field(init=False)  # generation requests in flight

    def __post_init__(self) -> None:
        self.admission = AdmissionController.from_settings(self.settings)
