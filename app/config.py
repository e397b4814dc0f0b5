"""Settings: the only module that reads the environment (LAMINA_*).

Every field has a safe default and is validated once at start-up, so a typo in a
deployment fails loudly before the model loads instead of misbehaving later.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app.weights import default_model_dir

ENV_PREFIX = "LAMINA_"


class Settings(BaseModel):
    """All tunables of one lamina process. Frozen: nothing mutates config after start."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # --- model -----------------------------------------------------------------
    model: Path = Field(default_factory=default_model_dir, description="local HF model folder")
    served_model_name: str | None = None  # default: the folder's name
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 CPU, bf16 CUDA
    # CPU only: store linear weights in half precision (fp32 math stays the reference).
    weight_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_model_len: int | None = Field(default=None, ge=16)  # default: the model's own
    num_threads: int | None = Field(default=None, ge=1)  # torch intra-op threads on CPU
    # CPU, fp32: lamina's own C kernels (compiled on first start, cached); false or no C
    # compiler: torch's kernels. Both are batch invariant; the native ones are faster.
    native_kernels: bool = True
    seed: int = 0

    # --- KV cache and scheduling -----------------------------------------------
    block_size: int = Field(default=16, ge=1, le=256)
    kv_cache_gb: float = Field(default=1.0, gt=0)  # CPU cache size in GiB
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=0.99)
    num_gpu_blocks_override: int | None = Field(default=None, ge=1)
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int = Field(default=512, ge=16)
    # Prompt tokens one step may compute while sequences decode (0: no cap beyond the
    # token budget). A long prefill chunk stalls every running stream for its duration.
    max_prefill_tokens_while_decoding: int = Field(default=256, ge=0)
    enable_prefix_caching: bool = True
    batch_invariant: bool = True
    cuda_graphs: bool = True

    # --- serving ---------------------------------------------------------------
    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=0, le=65535)
    max_queued: int = Field(default=256, ge=0)  # waiting requests before 429
    request_timeout_s: float | None = Field(default=None, gt=0)
    drain_timeout_s: float = Field(default=30.0, ge=0)
    keepalive_interval_s: float = Field(default=15.0, gt=0)
    warmup: bool = True

    # --- limits on a single request ----------------------------------------------
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_prompt_tokens: int | None = Field(default=None, ge=1)  # default: the context window
    max_tokens_limit: int | None = Field(default=None, ge=1)  # cap on max_tokens
    max_n: int = Field(default=8, ge=1)
    max_stop_sequences: int = Field(default=8, ge=0)
    max_stop_length: int = Field(default=256, ge=1)
    max_logit_bias: int = Field(default=300, ge=0)
    max_top_logprobs: int = Field(default=20, ge=0)
    max_prompts_per_request: int = Field(default=32, ge=1)  # completions' list of prompts

    # --- security --------------------------------------------------------------
    api_keys: tuple[str, ...] = ()
    open_routes: tuple[str, ...] = ("/health", "/ready", "/metrics")
    cors_origins: tuple[str, ...] = ()

    # --- logging ---------------------------------------------------------------
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_prompts: bool = False

    # --- test hooks (never set in production) ------------------------------------
    # Mounts POST /debug/engine/crash, which kills the engine thread (for fault tests).
    enable_test_hooks: bool = False
    # A request whose prompt contains this marker fails inside the engine step.
    fault_injection_marker: str | None = None

    @field_validator("api_keys", "open_routes", "cors_origins", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model.name


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
