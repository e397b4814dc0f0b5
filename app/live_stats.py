"""Rolling windows over the last minute, for GET /status and the dashboard.

Prometheus histograms answer "since the process started"; a person watching the engine
wants "now": tokens per second, TTFT and inter-token latency percentiles over the last
minute, the batch size of the last steps. `LiveStats` keeps just that, cheaply:

- per step (engine thread, `on_step`): one add into the current second's bucket, the
  step's batch size into a bounded deque, its inter-token gaps into a bounded deque;
- per finished choice (event loop, `on_ttft`) and per failed request (`on_failure`);
- `snapshot()` (event loop, on a GET /status) drops samples older than the window and
  computes percentiles over what is left: a few thousand floats at most.

One lock guards the deques: the engine thread and the event loop both write. No torch,
no engine import: app/metrics.py feeds it.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

WINDOW_S = 60
# Bounds on what one window may hold, so a burst cannot grow memory: 4096 inter-token
# gaps cover 68 tokens/s for a full minute; percentiles then cover the newest samples.
MAX_LATENCY_SAMPLES = 4096
NUM_RECENT_STEPS = 120
# The current rate averages the last few complete seconds (one second alone is jumpy).
RATE_SECONDS = 5


@dataclass(frozen=True)
class Percentiles:
    """Percentiles (seconds) of the samples of the window; None when there were none."""

    count: int
    p50: float | None
    p90: float | None
    p99: float | None


def percentiles(values: Iterable[float]) -> Percentiles:
    """Nearest-rank percentiles (the smallest value with at least p % of samples <= it)."""
    ordered = sorted(values)
    if not ordered:
        return Percentiles(0, None, None, None)

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    return Percentiles(len(ordered), rank(50), rank(90), rank(99))


@dataclass(frozen=True)
class LiveSnapshot:
    """What the last minute looked like, read by GET /status."""

    window_s: int
    output_tokens_per_s: float  # over the last RATE_SECONDS complete seconds
    # Tokens sampled in each of the last `window_s` whole seconds, oldest first.
    output_tokens_per_second: list[int]
    recent_batch_sizes: list[int]  # sequences in each of the last steps, oldest first
    steps: int  # engine steps in the window
    ttft_s: Percentiles  # requests that got a first token in the window
    itl_s: Percentiles  # inter-token gaps in the window
    errors_by_reason: dict[str, int]  # since start


class LiveStats:
    """The rolling windows of one app (see the module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, window_s: int = WINDOW_S):
        self._clock = clock
        self.window_s = window_s
        self._lock = threading.Lock()
        # (whole second, tokens sampled, steps) per second that saw a step, oldest first.
        self._seconds: deque[list[int]] = deque(maxlen=window_s + 1)
        self._batch_sizes: deque[int] = deque(maxlen=NUM_RECENT_STEPS)
        self._itl: deque[tuple[float, float]] = deque(maxlen=MAX_LATENCY_SAMPLES)
        self._ttft: deque[tuple[float, float]] = deque(maxlen=MAX_LATENCY_SAMPLES)
        self._errors: dict[str, int] = {}

    def on_step(self, num_seqs: int, num_sampled: int, inter_token_gaps_s: Iterable[float]):
        """Engine thread, once per step."""
        now = self._clock()
        second = int(now)
        with self._lock:
            if self._seconds and self._seconds[-1][0] == second:
                self._seconds[-1][1] += num_sampled
                self._seconds[-1][2] += 1
            else:
                self._seconds.append([second, num_sampled, 1])
            self._batch_sizes.append(num_seqs)
            self._itl.extend((now, gap) for gap in inter_token_gaps_s)

    def on_ttft(self, ttft_s: float) -> None:
        """API layer, once per choice that produced a first token."""
        with self._lock:
            self._ttft.append((self._clock(), ttft_s))

    def on_failure(self, reason: str) -> None:
        """API layer, once per failed request (metrics.FAILURE_REASONS)."""
        with self._lock:
            self._errors[reason] = self._errors.get(reason, 0) + 1

    def snapshot(self) -> LiveSnapshot:
        now = self._clock()
        oldest = now - self.window_s
        with self._lock:
            per_second = {second: (tokens, steps) for second, tokens, steps in self._seconds}
            batch_sizes = list(self._batch_sizes)
            itl = [gap for at, gap in self._itl if at >= oldest]
            ttft = [value for at, value in self._ttft if at >= oldest]
            errors = dict(self._errors)
        current = int(now)  # still filling: left out of the series and the rate
        seconds = range(current - self.window_s, current)
        tokens = [per_second.get(s, (0, 0))[0] for s in seconds]
        return LiveSnapshot(
            window_s=self.window_s,
            output_tokens_per_s=sum(tokens[-RATE_SECONDS:]) / RATE_SECONDS,
            output_tokens_per_second=tokens,
            recent_batch_sizes=batch_sizes,
            steps=sum(per_second.get(s, (0, 0))[1] for s in seconds),
            ttft_s=percentiles(ttft),
            itl_s=percentiles(itl),
            errors_by_reason=errors,
        )
