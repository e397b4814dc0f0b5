"""LiveStats: the last minute's windows behind GET /status, on a clock the test moves."""

from __future__ import annotations

import random

import pytest

from app.live_stats import RATE_SECONDS, LiveStats, percentiles


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def nearest_rank(values: list[float], p: float) -> float:
    """The textbook definition, written the slow way: the smallest sample with at least
    p % of the samples at or below it."""
    for candidate in sorted(values):
        if sum(v <= candidate for v in values) >= p / 100 * len(values):
            return candidate
    raise AssertionError("unreachable")


@pytest.mark.parametrize("size", [1, 2, 3, 10, 99, 100, 101, 1000])
def test_percentiles_are_nearest_rank(size: int) -> None:
    values = [random.Random(size).uniform(0, 5) for _ in range(size)]
    got = percentiles(values)
    assert got.count == size
    assert (got.p50, got.p90, got.p99) == tuple(nearest_rank(values, p) for p in (50, 90, 99))


def test_no_samples_give_no_percentiles() -> None:
    got = percentiles([])
    assert (got.count, got.p50, got.p90, got.p99) == (0, None, None, None)


def test_tokens_per_second_series_and_rate() -> None:
    clock = Clock(1000.2)
    live = LiveStats(clock, window_s=10)
    for second, tokens in [(1000, 3), (1000, 4), (1003, 5), (1009, 8)]:
        clock.now = second + 0.5
        live.on_step(num_seqs=tokens, num_sampled=tokens, inter_token_gaps_s=())
    clock.now = 1010.1  # second 1010 has begun: 1000..1009 are complete
    snap = live.snapshot()
    assert snap.output_tokens_per_second == [7, 0, 0, 5, 0, 0, 0, 0, 0, 8]
    assert snap.output_tokens_per_s == pytest.approx(8 / RATE_SECONDS)
    assert snap.steps == 4
    assert snap.recent_batch_sizes == [3, 4, 5, 8]


def test_the_second_still_filling_is_left_out() -> None:
    clock = Clock(50.5)
    live = LiveStats(clock, window_s=5)
    live.on_step(1, 9, ())
    snap = live.snapshot()
    assert snap.output_tokens_per_second == [0] * 5 and snap.output_tokens_per_s == 0
    clock.now = 51.0
    assert live.snapshot().output_tokens_per_second == [0, 0, 0, 0, 9]


def test_latencies_older_than_the_window_are_dropped() -> None:
    clock = Clock(0.0)
    live = LiveStats(clock, window_s=60)
    live.on_step(2, 2, (0.5, 0.7))
    live.on_ttft(3.0)
    clock.now = 30.0
    live.on_step(1, 1, (0.1,))
    live.on_ttft(1.0)
    snap = live.snapshot()
    assert (snap.itl_s.count, snap.itl_s.p99, snap.ttft_s.count) == (3, 0.7, 2)
    clock.now = 61.0  # the samples taken at 0 s have left the window
    snap = live.snapshot()
    assert (snap.itl_s.count, snap.itl_s.p50, snap.ttft_s.count, snap.ttft_s.p50) == (
        1, 0.1, 1, 1.0,
    )  # fmt: skip
    clock.now = 200.0
    snap = live.snapshot()
    assert snap.itl_s.count == 0 and snap.ttft_s.p50 is None and snap.steps == 0


def test_errors_are_counted_by_reason() -> None:
    live = LiveStats(Clock())
    for reason in ("timeout", "validation", "timeout"):
        live.on_failure(reason)
    assert live.snapshot().errors_by_reason == {"timeout": 2, "validation": 1}


def test_memory_is_bounded() -> None:
    live = LiveStats(Clock())
    for _ in range(10_000):
        live.on_step(64, 64, (0.01,) * 64)
    snap = live.snapshot()
    assert len(snap.recent_batch_sizes) == 120
    assert snap.itl_s.count == 4096
