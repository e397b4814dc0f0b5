"""Prometheus metrics, named like vLLM's with the `lamina:` prefix.

Who updates what:
- the engine thread, once per step, through `observe_step` (a step observer):
  tokens per step, step duration, inter-token latency;
- the API layer (app/api/request_record.py): `observe_prompt` once per accepted prompt,
  `observe_choice` once per choice when it ends (generation tokens, successes, TTFT,
  end-to-end, queue, prefill and decode times), `observe_failure` once per failed HTTP
  request (its one reason);
- the HTTP middleware: requests by route and status, requests in flight;
- `live` (app/live_stats.py): the last minute's rolling windows for GET /status, fed by
  the same calls;
- at scrape time, from the engine's own counters (`EngineStatsCollector`): running and
  waiting sequences, KV-cache usage, preemptions and prefix-cache queries/hits. Reading
  them at scrape time keeps the gauges exact even when the engine is idle.

Every metric carries the label `model_name`. One registry per app, so several apps can
live in one process (tests) without clashing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.core import FinishReason, RequestTimings
from app.live_stats import LiveStats

if TYPE_CHECKING:  # the engine's types only: metrics must not pull the engine in
    from app.engine.engine_core import EngineStats, StepStats
    from app.engine.speculative import SpeculationStats

PREFIX = "lamina:"

# `*_created` series double the exposition and no dashboard uses them.
disable_created_metrics()

# Buckets wide enough for a 2-core CPU (seconds per token) and a GPU (milliseconds).
LATENCY_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
TOKEN_LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS_S = (
    0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0,
)  # fmt: skip
TOKEN_COUNT_BUCKETS = (
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000,
)  # fmt: skip
STEP_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

FAILURE_REASONS = (
    "validation",
    "overloaded",
    "unavailable",
    "aborted",
    "timeout",
    "error",
    "unauthorized",
)


@dataclass(frozen=True)
class EngineCounters:
    """What the scrape-time collector reads from the engine (a subset of EngineStats)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    alive: bool
    speculation: SpeculationStats | None = None  # None: speculative decoding is off


def read_engine_counters(engine: object) -> EngineCounters:
    """The scrape-time view of an engine. Waiting includes requests accepted but not
    yet seen by the engine thread: both are queue depth to an autoscaler."""
    alive = bool(getattr(engine, "is_alive", False))
    stats_of = getattr(engine, "stats", None)
    if stats_of is None:
        return EngineCounters(0, 0, 0.0, 0, 0, 0, alive)
    stats: EngineStats = stats_of()
    return EngineCounters(
        num_running=stats.num_running,
        num_waiting=stats.num_waiting + stats.num_pending_requests,
        kv_cache_usage=stats.kv_cache_usage,
        num_preemptions=stats.num_preemptions,
        prefix_cache_queries=stats.prefix_cache_queries,
        prefix_cache_hits=stats.prefix_cache_hits,
        alive=alive,
        speculation=stats.speculation,
    )


class EngineStatsCollector(Collector):
    """Gauges and counters read from the engine at scrape time."""

    def __init__(self, model_name: str, read: Callable[[], EngineCounters | None]) -> None:
        self._model_name = model_name
        self._read = read

    def collect(self) -> Iterable[Metric]:
        stats = self._read()
        labels = [self._model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric(labels, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric(labels, value)
            return family

        s = stats or EngineCounters(0, 0, 0.0, 0, 0, 0, False)
        yield gauge("num_requests_running", "Sequences holding KV blocks now.", s.num_running)
        yield gauge("num_requests_waiting", "Sequences queued for admission.", s.num_waiting)
        yield gauge("kv_cache_usage_perc", "KV-cache usage, 0 to 1.", s.kv_cache_usage)
        yield gauge("engine_alive", "1 while the engine thread runs.", 1.0 if s.alive else 0.0)
        yield counter(
            "num_preemptions", "Sequences preempted (recomputed later).", s.num_preemptions
        )
        yield counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
            s.prefix_cache_queries,
        )  # fmt: skip
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                      s.prefix_cache_hits)  # fmt: skip
        if s.speculation is not None:
            yield from self._speculation_metrics(s.speculation, counter)

    def _speculation_metrics(
        self, spec: SpeculationStats, counter: Callable[[str, str, float], CounterMetricFamily]
    ) -> Iterable[Metric]:
        """vLLM's spec_decode counters (only while speculative decoding is on)."""
        yield counter("spec_decode_num_drafts", "Verify steps: drafts computed.", spec.num_drafts)
        yield counter(
            "spec_decode_num_draft_tokens", "Draft tokens computed.", spec.num_draft_tokens
        )
        yield counter(
            "spec_decode_num_accepted_tokens", "Draft tokens accepted.", spec.num_accepted_tokens
        )
        family = CounterMetricFamily(
            PREFIX + "spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted at each position of their draft (0: the first).",
            labels=["model_name", "position"],
        )
        for position, count in enumerate(spec.accepted_per_position):
            family.add_metric([self._model_name, str(position)], count)
        yield family


class Metrics:
    """All collectors of one lamina app, in their own registry."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.model_name = model_name
        self.registry = registry or CollectorRegistry()
        self.live = LiveStats()  # the last minute, for GET /status
        self._engine_reader: Callable[[], EngineCounters | None] = lambda: None
        self.registry.register(EngineStatsCollector(model_name, lambda: self._engine_reader()))
        self._define_request_metrics()
        self._define_step_metrics()
        self._define_http_metrics()

    # ----------------------------------------------------------------- definitions
    def _counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(PREFIX + name, doc, ("model_name", *labels), registry=self.registry)

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(
            PREFIX + name, doc, ("model_name",), buckets=buckets, registry=self.registry
        )

    def _define_request_metrics(self) -> None:
        m = self.model_name
        self.prompt_tokens = self._counter("prompt_tokens", "Prompt tokens processed.").labels(m)
        self.generation_tokens = self._counter("generation_tokens", "Tokens generated.").labels(m)
        self.request_success = self._counter(
            "request_success", "Finished requests by finish reason.", ("finished_reason",)
        )
        self.request_failure = self._counter(
            "request_failure", "Failed requests by reason.", ("reason",)
        )
        for reason in ("stop", "length"):
            self.request_success.labels(m, reason)
        for reason in FAILURE_REASONS:
            self.request_failure.labels(m, reason)
        h = self._histogram
        self.ttft = h("time_to_first_token_seconds", "Arrival to first token.", LATENCY_BUCKETS_S)
        self.e2e = h("e2e_request_latency_seconds", "Arrival to last token.",
                     REQUEST_LATENCY_BUCKETS_S)  # fmt: skip
        self.queue_time = h("request_queue_time_seconds", "Arrival to first scheduled.",
                            REQUEST_LATENCY_BUCKETS_S)  # fmt: skip
        self.prefill_time = h("request_prefill_time_seconds", "First scheduled to first token.",
                              REQUEST_LATENCY_BUCKETS_S)  # fmt: skip
        self.decode_time = h("request_decode_time_seconds", "First token to last token.",
                             REQUEST_LATENCY_BUCKETS_S)  # fmt: skip
        self.request_prompt_tokens = h("request_prompt_tokens", "Prompt tokens per request.",
                                       TOKEN_COUNT_BUCKETS)  # fmt: skip
        self.request_generation_tokens = h(
            "request_generation_tokens", "Generated tokens per request.", TOKEN_COUNT_BUCKETS
        )

    def _define_step_metrics(self) -> None:
        h = self._histogram
        self.inter_token_latency = h(
            "inter_token_latency_seconds", "Time between two tokens of a sequence.",
            TOKEN_LATENCY_BUCKETS_S,
        )  # fmt: skip
        self.iteration_tokens = h(
            "iteration_tokens_total", "Tokens computed per engine step.", STEP_TOKEN_BUCKETS
        )
        self.step_duration = h(
            "engine_step_duration_seconds", "Duration of one engine step.", TOKEN_LATENCY_BUCKETS_S
        )

    def _define_http_metrics(self) -> None:
        self.http_requests = self._counter(
            "http_requests", "HTTP requests by route, method and status.",
            ("route", "method", "status"),
        )  # fmt: skip
        self.http_in_flight = Gauge(
            PREFIX + "http_requests_in_flight", "HTTP requests being served.", ("model_name",),
            registry=self.registry,
        ).labels(self.model_name)  # fmt: skip

    # ------------------------------------------------------------------- updates
    def bind_engine(self, read: Callable[[], EngineCounters | None]) -> None:
        """Tell the scrape-time collector how to read the engine's counters."""
        self._engine_reader = read

    def attach_engine(self, engine: object) -> None:
        """Observe `engine` (app.engine.engine.Engine, or a test double offering less):
        each step through its step observers, and its stats() at scrape time."""
        add_step_observer = getattr(engine, "add_step_observer", None)
        if add_step_observer is not None:
            add_step_observer(self._on_step)
        self.bind_engine(lambda: read_engine_counters(engine))

    def _on_step(self, step: StepStats) -> None:
        self.observe_step(step.num_batched_tokens, step.duration_s, step.inter_token_gaps_s)
        self.live.on_step(step.num_seqs, step.num_sampled, step.inter_token_gaps_s)

    def observe_step(self, num_batched_tokens: int, duration_s: float,
                     inter_token_gaps_s: Iterable[float]) -> None:  # fmt: skip
        """Engine thread, once per step."""
        m = self.model_name
        self.iteration_tokens.labels(m).observe(num_batched_tokens)
        self.step_duration.labels(m).observe(duration_s)
        itl = self.inter_token_latency.labels(m)
        for gap in inter_token_gaps_s:
            itl.observe(gap)

    def observe_choice(
        self,
        finish_reason: FinishReason | None,
        num_generated_tokens: int,
        timings: RequestTimings | None = None,
    ) -> None:
        """API layer, once per choice (sequence) when it ends, however it ends.

        `finish_reason` is None for a choice cut short without a final delta (the
        client left). Successes (stop, length) count in `request_success` and feed
        the latency histograms; failures are counted once per HTTP request instead,
        through `observe_failure`.
        """
        m = self.model_name
        self.generation_tokens.inc(num_generated_tokens)
        self.request_generation_tokens.labels(m).observe(num_generated_tokens)
        if finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
            self.request_success.labels(m, finish_reason.value).inc()
            if timings is not None:
                self._observe_timings(timings)

    def observe_prompt(self, num_prompt_tokens: int) -> None:
        """API layer, once per accepted request (the prompt is computed once for n choices)."""
        self.prompt_tokens.inc(num_prompt_tokens)
        self.request_prompt_tokens.labels(self.model_name).observe(num_prompt_tokens)

    def _observe_timings(self, t: RequestTimings) -> None:
        m = self.model_name
        self.e2e.labels(m).observe(max(0.0, t.finished - t.arrival))
        if t.first_scheduled is not None:
            self.queue_time.labels(m).observe(max(0.0, t.first_scheduled - t.arrival))
        if t.first_token is not None:
            self.ttft.labels(m).observe(max(0.0, t.first_token - t.arrival))
            self.live.on_ttft(max(0.0, t.first_token - t.arrival))
            self.decode_time.labels(m).observe(max(0.0, t.finished - t.first_token))
            if t.first_scheduled is not None:
                self.prefill_time.labels(m).observe(max(0.0, t.first_token - t.first_scheduled))

    def observe_failure(self, reason: str) -> None:
        """A request that ended without a normal result (see FAILURE_REASONS).

        Routes do not call this directly: app.api.request_record.RequestRecord.fail counts a
        request once, whichever layer notices its failure first."""
        if reason not in FAILURE_REASONS:
            raise ValueError(f"unknown failure reason {reason!r}; one of {FAILURE_REASONS}")
        self.request_failure.labels(self.model_name, reason).inc()
        self.live.on_failure(reason)

    def observe_http(self, route: str, method: str, status: int) -> None:
        self.http_requests.labels(self.model_name, route, method, str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
