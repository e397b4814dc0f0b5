"""Settings: the only module that reads the environment (LAMINA_*).

Every field has a safe default and is validated once at start-up, so a typo in a
deployment fails loudly before the model loads instead of misbehaving later.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from app.weights import default_model_dir
from app.weights_source import parse_model_spec, resolve_model_folder

ENV_PREFIX = "LAMINA_"
# The speculative_* settings each LAMINA_SPECULATIVE mode reads; it ignores the others.
SPECULATIVE_SETTINGS_READ = {
    "off": (),
    "ngram": (
        "speculative_tokens",
        "speculative_ngram_min",
        "speculative_ngram_max",
        "speculative_max_batch",
    ),
    "draft": (
        "speculative_model",
        "speculative_weight_dtype",
        "speculative_tokens",
        "speculative_max_batch",
    ),
}


class Settings(BaseModel):
    """All tunables of one lamina process. Frozen: nothing mutates config after start."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # --- model -----------------------------------------------------------------
    model: Path = Field(
        default_factory=default_model_dir,
        description="a local Hugging Face model folder (safetensors, tokenizer, config.json), "
        "a `.gguf` file, or a hub id `org/name[@revision]` (see Models)",
    )
    served_model_name: str | None = Field(
        default=None,
        description="the model's id in the API; unset: the folder's name, the .gguf file's "
        "stem or the hub id",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="`auto`: CUDA when torch sees a GPU, else the CPU"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="model precision; `auto`: float32 on the CPU, bfloat16 on CUDA"
    )
    weight_dtype: Literal["auto", "float32", "float16", "bfloat16", "int8", "int4"] = Field(
        default="auto",
        description="CPU only: precision the linear weights are stored in; `auto`: the model "
        "dtype, or for a GGUF file the precision that keeps its weights (see Models, Weight "
        "precision)",
    )
    max_model_len: int | None = Field(
        default=None,
        ge=16,
        description="context window in tokens; unset: the model's `max_position_embeddings`",
    )
    num_threads: int | None = Field(
        default=None,
        ge=1,
        description="CPU threads for the model; unset: the physical cores this process may "
        "use, capped by the cgroup CPU quota",
    )
    native_kernels: bool = Field(
        default=True,
        description="CPU: lamina's own C kernels (compiled on first start, cached); `false`, "
        "or no C compiler and no prebuilt library: torch's kernels",
    )
    seed: int = Field(
        default=0, description="seed of unseeded sampling, so a process's outputs are reproducible"
    )

    # --- KV cache and scheduling -----------------------------------------------
    block_size: int = Field(default=16, ge=1, le=256, description="tokens per KV-cache block")
    kv_cache_gb: float = Field(default=1.0, gt=0, description="CPU: KV-cache size in GiB")
    gpu_memory_utilization: float = Field(
        default=0.85,
        gt=0,
        le=0.99,
        description="CUDA: fraction of the GPU's memory lamina may use; the KV cache gets what "
        "the weights and a profiling pass leave",
    )
    num_gpu_blocks_override: int | None = Field(
        default=None, ge=1, description="CUDA: a fixed number of KV-cache blocks instead"
    )
    max_num_seqs: int = Field(
        default=64, ge=1, description="sequences running at once (each choice of `n` is one)"
    )
    max_num_batched_tokens: int = Field(
        default=512,
        ge=16,
        description="tokens computed in one engine step (prompt chunks included)",
    )
    # A long prefill chunk stalls every running stream for its duration.
    max_prefill_tokens_while_decoding: int = Field(
        default=256,
        ge=0,
        description="prompt tokens one step may compute while sequences decode, which keeps "
        "their inter-token latency flat; 0: no cap beyond the step's budget",
    )
    enable_prefix_caching: bool = Field(
        default=True, description="reuse the KV cache of prompt prefixes seen before"
    )
    speculative: Literal["off", "ngram", "draft"] = Field(
        default="off",
        description="speculative decoding: `ngram` drafts tokens by looking the last tokens up "
        "in the prompt and output so far (prompt lookup), `draft` has a small model "
        "(`LAMINA_SPECULATIVE_MODEL`) propose them; either is verified in the same step and "
        "the output stays token for token what it is with `off`",
    )
    speculative_model: Path | None = Field(
        default=None,
        description="speculative decoding `draft`: a model folder, `.gguf` file or hub id (as "
        "`LAMINA_MODEL`) sharing the served model's tokenizer (checked at start-up): a smaller "
        "model of the same family, or the served model itself with "
        "`LAMINA_SPECULATIVE_WEIGHT_DTYPE=int4`",
    )
    speculative_weight_dtype: Literal["auto", "float32", "float16", "bfloat16", "int8", "int4"] = (
        Field(
            default="auto",
            description="speculative decoding `draft`, CPU only: precision the draft model's "
            "linear weights are stored in; `auto`: as the served model's",
        )
    )
    speculative_tokens: int = Field(
        default=4, ge=1, le=32, description="speculative decoding: most tokens drafted per step"
    )
    speculative_ngram_min: int = Field(
        default=2, ge=1, description="speculative decoding: shortest n-gram looked up"
    )
    speculative_ngram_max: int = Field(
        default=4, ge=1, description="speculative decoding: longest n-gram looked up (tried first)"
    )
    speculative_max_batch: int = Field(
        default=8,
        ge=0,
        description="speculative decoding: no step drafts while more sequences than this "
        "decode (the step is compute bound there, draft tokens cost like any)",
    )
    batch_invariant: bool = Field(
        default=True,
        description="the same tokens for a greedy or seeded request alone or in any batch "
        "(free with the native kernels; torch's need padding)",
    )
    cuda_graphs: bool = Field(default=True, description="CUDA: replay decode steps as CUDA graphs")
    embedding_pooling: Literal["auto", "last", "mean"] = Field(
        default="auto",
        description="how `/v1/embeddings` pools the final hidden states: the `last` token's or "
        "the `mean` over the prompt; `auto`: the model folder's sentence-transformers pooling "
        "config when it has one (last token or mean), else `last`",
    )

    # --- serving ---------------------------------------------------------------
    host: str = Field(default="0.0.0.0", description="address to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="port to listen on")
    max_queued: int = Field(
        default=256,
        ge=0,
        description="generation requests that may wait beyond the free running slots; more get 429",
    )
    max_queued_sequences: int | None = Field(
        default=None,
        ge=0,
        description="sequences (prompts x `n`) admitted beyond `LAMINA_MAX_NUM_SEQS`; more get "
        "429, a request needing more than both is a 413; unset: 4 x `LAMINA_MAX_NUM_SEQS`",
    )
    max_admitted_tokens: int | None = Field(
        default=None,
        ge=1,
        description="estimated tokens (prompt + `max_tokens`, per sequence) of all admitted "
        "generation requests, running or waiting; more get 429, a request needing more is a "
        "413; unset: what the KV cache holds",
    )
    max_client_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="while other clients hold work or were just refused, the fraction of each "
        "admission bound one client (API key, else address) may hold; 1: no fair share",
    )
    request_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="deadline of a generation request, queue time included (504, or an error "
        "event); unset: none. `X-Request-Timeout` can shorten it",
    )
    drain_timeout_s: float = Field(
        default=30.0,
        ge=0,
        description="on SIGTERM, how long requests in flight may run before they are stopped",
    )
    keepalive_interval_s: float = Field(
        default=15.0,
        gt=0,
        description="seconds without a token before a stream gets a `: keep-alive` comment",
    )
    priority_ageing_s: float = Field(
        default=10.0,
        ge=0,
        description="a waiting request's `priority` improves by 1 per this many seconds waited "
        "(bounds the wait of low priorities); 0: no ageing",
    )
    responses_store_max_entries: int = Field(
        default=1000,
        ge=0,
        description="responses of `/v1/responses` kept in memory (`store`), least recently "
        "used evicted first; 0: none kept",
    )
    responses_store_ttl_s: float = Field(
        default=3600.0,
        gt=0,
        description="seconds a stored response is kept after its last change",
    )
    warmup: bool = Field(
        default=True,
        description="run a prefill and a decode step before turning ready, so the first request "
        "pays no first-call costs",
    )

    # --- connections (before HTTP: see Reliability) -------------------------------
    max_connections: int = Field(
        default=4096,
        ge=1,
        description="client connections open at once; at the cap a new one replaces the one "
        "idle the longest, or gets a 503 when all are busy. Kept 256 below the open-file "
        "limit, which start-up raises to its hard limit",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="seconds to receive a request's line and headers, from its first byte (or "
        "from connecting); then 408 and close",
    )
    body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="seconds to receive a request body, from the end of its headers; then 408 "
        "and close",
    )
    idle_timeout_s: float = Field(
        default=75.0,
        gt=0,
        description="seconds a keep-alive connection may stay unused between requests; keep "
        "it above a load balancer's own idle timeout (nginx here: 60 s)",
    )

    # --- limits on a single request ----------------------------------------------
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="request body size (413 above it)"
    )
    max_prompt_tokens: int | None = Field(
        default=None, ge=1, description="prompt tokens; unset: the context window minus one"
    )
    max_tokens_limit: int | None = Field(
        default=None,
        ge=1,
        description="cap on `max_tokens` / `max_new_tokens`; unset: the context window",
    )
    default_max_tokens: int = Field(
        default=1024,
        ge=1,
        description="`max_tokens` / `max_new_tokens` of a request that sets none (at most "
        "what the context window leaves after the prompt)",
    )
    chat_control_tokens: Literal["text", "reject"] = Field(
        default="text",
        description="a control token (`<|im_start|>`...) in a chat message's text: "
        "`text` encodes it as plain text, `reject` answers 400",
    )
    tool_call_format: Literal["auto", "hermes", "llama3_json"] = Field(
        default="auto",
        description="how the model writes tool calls: `auto` reads it from the chat "
        "template (Llama 3 templates: `llama3_json`; others: `hermes`), or name one",
    )
    max_n: int = Field(default=8, ge=1, description="choices per request (`n`)")
    max_stop_sequences: int = Field(default=8, ge=0, description="`stop` strings per request")
    max_stop_length: int = Field(default=256, ge=1, description="characters in one `stop` string")
    max_logit_bias: int = Field(default=300, ge=0, description="entries in `logit_bias`")
    max_top_logprobs: int = Field(
        default=20, ge=0, description="`logprobs`, `top_logprobs`, `top_n_tokens`"
    )
    max_prompts_per_request: int = Field(
        default=32,
        ge=1,
        description="prompts in one `/v1/completions` request, inputs in one `/v1/embeddings`",
    )

    # --- security --------------------------------------------------------------
    api_keys: tuple[str, ...] = Field(
        default=(),
        description="bearer keys every route requires, except `LAMINA_OPEN_ROUTES`; empty: "
        "no authentication. `key:N` gives the key's requests the priority N (their default, "
        "and the lowest they may ask for)",
    )
    open_routes: tuple[str, ...] = Field(
        default=("/health", "/ready", "/metrics"),
        description="routes open without a key; an entry ending in `*` is a prefix",
    )
    cors_origins: tuple[str, ...] = Field(
        default=(), description="origins allowed by CORS; empty: no CORS headers"
    )
    ui: bool = Field(
        default=True,
        description="serve the playground (`GET /` from a browser) and `GET /dashboard`; "
        "their static pages need no key, the API calls they make do",
    )

    # --- logging ---------------------------------------------------------------
    log_format: Literal["json", "text"] = Field(
        default="json", description="one JSON object per line, or text for a terminal"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="lowest level logged"
    )
    log_prompts: bool = Field(
        default=False, description="add prompts and generated text to access lines"
    )

    # --- test hooks (never set in production) ------------------------------------
    enable_test_hooks: bool = Field(
        default=False,
        description="tests only: mounts `POST /debug/engine/crash`, which kills the engine thread",
    )
    fault_injection_marker: str | None = Field(
        default=None,
        description="tests only: a request whose prompt contains this text fails inside the "
        "engine step",
    )

    @model_validator(mode="after")
    def _check_ngram_range(self) -> Settings:
        if self.speculative_ngram_min > self.speculative_ngram_max:
            raise ValueError("speculative_ngram_min must not exceed speculative_ngram_max")
        return self

    @model_validator(mode="after")
    def _check_draft_model(self) -> Settings:
        if self.speculative == "draft" and self.speculative_model is None:
            raise ValueError(
                "speculative=draft needs LAMINA_SPECULATIVE_MODEL, the draft model's folder"
            )
        return self

    @field_validator("api_keys", "open_routes", "cors_origins", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    def ignored_settings(self) -> list[str]:
        """One line per LAMINA_SPECULATIVE_* variable set that LAMINA_SPECULATIVE's mode
        ignores (a draft model named with speculation off), which start-up warns of
        instead of letting it look in effect."""
        read = SPECULATIVE_SETTINGS_READ[self.speculative]
        ignored = sorted(
            name
            for name in self.model_fields_set
            if name.startswith("speculative_") and name not in read
        )
        return [
            f"{ENV_PREFIX}{name.upper()} is set but ignored: "
            f"{ENV_PREFIX}SPECULATIVE={self.speculative} does not use it"
            for name in ignored
        ]

    @property
    def model_name(self) -> str:
        return self.served_model_name or parse_model_spec(self.model).served_name

    def with_model_folder(self) -> Settings:
        """These settings with `model` resolved to a local folder (blocking: may download
        or read a GGUF's metadata; ModelSourceError if it cannot) and the served name
        kept."""
        folder = resolve_model_folder(self.model)
        return self.model_copy(update={"model": folder, "served_model_name": self.model_name})


def _env_values(environ: dict[str, str]) -> dict[str, str]:
    values = {}
    for key, raw in environ.items():
        if key.startswith(ENV_PREFIX) and raw != "":
            values[key[len(ENV_PREFIX) :].lower()] = raw
    return values


class SettingsError(ValueError):
    """A setting from the environment is invalid; the message names the variable."""


def load_settings(environ: dict[str, str] | None = None, **overrides: object) -> Settings:
    """Build Settings from LAMINA_* variables, then keyword overrides (CLI flags, tests)."""
    values: dict[str, object] = dict(_env_values(dict(os.environ if environ is None else environ)))
    known = set(Settings.model_fields)
    unknown = sorted(k for k in values if k not in known)
    if unknown:
        names = ", ".join(ENV_PREFIX + k.upper() for k in unknown)
        raise SettingsError(f"unknown setting(s): {names}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{ENV_PREFIX}{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()
        )
        raise SettingsError(problems) from None
