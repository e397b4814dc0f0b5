"""GET /status: what the engine is doing now, in one small JSON document.

The dashboard (app/ui) polls it every second; so can a script. It joins three sources:
the engine's own counters (read now, like /metrics at scrape time), the last minute's
rolling windows (app/live_stats.py, fed by app/metrics.py) and what the server was
started with (model, device, dtype, kernels, the settings that shape throughput).
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from app import __version__
from app.api.route_facts import PROBE, declare
from app.api.state import ServerState, StateDep
from app.config import Settings
from app.metrics import read_engine_counters

router = APIRouter(tags=["Health"])


class LatencyPercentiles(BaseModel):
    count: int = Field(description="Samples in the window")
    p50: float | None = Field(description="Seconds; null without samples")
    p90: float | None
    p99: float | None


class EngineNow(BaseModel):
    alive: bool
    running: int = Field(description="Sequences holding KV blocks now")
    waiting: int = Field(description="Sequences queued, accepted ones not yet seen included")
    kv_cache_usage: float = Field(description="Fraction of KV blocks in use, 0 to 1")
    preemptions: int = Field(description="Sequences preempted since start")
    prefix_cache_hit_rate: float | None = Field(
        description="Prompt tokens found in the prefix cache / looked up, since start"
    )


class LastMinute(BaseModel):
    window_s: int
    output_tokens_per_s: float = Field(description="Over the last 5 complete seconds")
    output_tokens_per_second: list[int] = Field(
        description="Tokens generated in each of the last window_s seconds, oldest first"
    )
    recent_batch_sizes: list[int] = Field(
        description="Sequences in each of the last (up to 120) engine steps, oldest first"
    )
    steps: int = Field(description="Engine steps in the window")
    ttft_s: LatencyPercentiles = Field(description="Time to first token of finished requests")
    itl_s: LatencyPercentiles = Field(description="Inter-token latency")


class ServedModel(BaseModel):
    name: str
    max_model_len: int
    device: str | None
    dtype: str | None
    kernels: dict[str, str] | None = Field(description="Which kernels compute it, in words")


class StatusReport(BaseModel):
    """GET /status."""

    version: str
    phase: str = Field(description="loading, ready, draining or failed")
    uptime_s: float
    model: ServedModel | None = Field(description="null while loading")
    engine: EngineNow | None = Field(description="null while loading")
    last_minute: LastMinute
    errors_by_reason: dict[str, int] = Field(description="Failed requests since start")
    settings: dict[str, object] = Field(description="The settings that shape serving")


def key_settings(settings: Settings) -> dict[str, object]:
    """The settings an operator looks for first; never a secret (keys: only whether set)."""
    return {
        "max_num_seqs": settings.max_num_seqs,
        "max_num_batched_tokens": settings.max_num_batched_tokens,
        "max_queued": settings.max_queued,
        "block_size": settings.block_size,
        "kv_cache_gb": settings.kv_cache_gb,
        "enable_prefix_caching": settings.enable_prefix_caching,
        "batch_invariant": settings.batch_invariant,
        "weight_dtype": settings.weight_dtype,
        "native_kernels": settings.native_kernels,
        "num_threads": settings.num_threads,
        "request_timeout_s": settings.request_timeout_s,
        "api_keys": bool(settings.api_keys),
    }


def _engine_now(state: ServerState) -> EngineNow | None:
    if state.serving is None:
        return None
    counters = read_engine_counters(state.serving.engine)
    queries = counters.prefix_cache_queries
    return EngineNow(
        alive=counters.alive,
        running=counters.num_running,
        waiting=counters.num_waiting,
        kv_cache_usage=counters.kv_cache_usage,
        preemptions=counters.num_preemptions,
        prefix_cache_hit_rate=counters.prefix_cache_hits / queries if queries else None,
    )


@router.get(declare("/status", PROBE), response_model=StatusReport, summary="Engine status now")
async def status(request: Request, state: StateDep) -> StatusReport:
    """Running and waiting requests, KV use, the last minute's throughput and latency
    percentiles, errors, the served model and key settings (the dashboard's source)."""
    live = request.app.state.metrics.live.snapshot()
    serving = state.serving
    model = None
    if serving is not None:  # its ModelInfo, the fields ServedModel names
        model = ServedModel.model_validate(serving.model, from_attributes=True)
    return StatusReport(
        version=__version__,
        phase=state.readiness.phase.value,
        uptime_s=round(time.monotonic() - state.started_monotonic, 3),
        model=model,
        engine=_engine_now(state),
        last_minute=LastMinute.model_validate(live, from_attributes=True),
        errors_by_reason=live.errors_by_reason,
        settings=key_settings(state.settings),
    )
