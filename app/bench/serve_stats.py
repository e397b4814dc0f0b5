"""Percentiles and per-level summaries for `lamina bench serve`."""

from __future__ import annotations

from dataclasses import dataclass

from app.bench.serve_client import RequestRecord


def format_ms(seconds: float | None) -> str:
    """A duration in whole milliseconds for tables; "-" when there is none."""
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def format_s(seconds: float | None, decimals: int = 2) -> str:
    """A duration in seconds for tables; "-" when there is none."""
    return "-" if seconds is None else f"{seconds:.{decimals}f}"


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class LevelSummary:
    concurrency: int
    num_requests: int
    num_errors: int
    duration_s: float
    output_tok_s: float
    requests_per_s: float
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    ttft_p99_s: float | None
    itl_p50_s: float | None
    itl_p90_s: float | None
    itl_p99_s: float | None
    itl_max_s: float | None  # the longest stall any stream saw
    e2e_p50_s: float | None
    e2e_p90_s: float | None
    e2e_p99_s: float | None
    first_error: str | None = None
    # Open-loop long-prompt requests (--long-prompt-len), apart from the streams above.
    num_long_requests: int = 0
    num_long_errors: int = 0
    long_ttft_p50_s: float | None = None
    long_ttft_p99_s: float | None = None

    def add_long_prompts(self, records: list[RequestRecord]) -> None:
        ok = [r for r in records if r.ok]
        ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
        self.num_long_requests = len(records)
        self.num_long_errors = len(records) - len(ok)
        self.long_ttft_p50_s = percentile(ttft, 50)
        self.long_ttft_p99_s = percentile(ttft, 99)

    def long_prompts_row(self) -> str:
        ms = format_ms
        return (
            f"  + {self.num_long_requests} long-prompt requests: TTFT p50/p99 "
            f"{ms(self.long_ttft_p50_s)}/{ms(self.long_ttft_p99_s)} ms, "
            f"{self.num_long_errors} errors"
        )

    @staticmethod
    def table_header() -> str:
        return (
            f"{'conc':>5} {'tok/s':>8} {'req/s':>6} {'TTFT p50/p99 ms':>16} "
            f"{'ITL p50/p99/max ms':>19} {'E2E p50/p99 s':>14} {'errors':>6}"
        )

    def table_row(self) -> str:
        ms = format_ms

        def s(v: float | None) -> str:
            return format_s(v, decimals=1)

        return (
            f"{self.concurrency:5d} {self.output_tok_s:8.1f} {self.requests_per_s:6.2f} "
            f"{ms(self.ttft_p50_s) + '/' + ms(self.ttft_p99_s):>16} "
            f"{ms(self.itl_p50_s) + '/' + ms(self.itl_p99_s) + '/' + ms(self.itl_max_s):>19} "
            f"{s(self.e2e_p50_s) + '/' + s(self.e2e_p99_s):>14} {self.num_errors:6d}"
        )


def summarize(concurrency: int, records: list[RequestRecord], duration_s: float) -> LevelSummary:
    ok = [r for r in records if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    gaps = [g for r in ok for g in r.chunk_gaps_s]
    e2e = [r.e2e_s for r in ok]
    tokens = sum(r.output_tokens for r in ok)
    errors = [r for r in records if not r.ok]
    return LevelSummary(
        concurrency=concurrency,
        num_requests=len(records),
        num_errors=len(errors),
        duration_s=duration_s,
        output_tok_s=tokens / duration_s if duration_s > 0 else 0.0,
        requests_per_s=len(ok) / duration_s if duration_s > 0 else 0.0,
        ttft_p50_s=percentile(ttft, 50),
        ttft_p90_s=percentile(ttft, 90),
        ttft_p99_s=percentile(ttft, 99),
        itl_p50_s=percentile(gaps, 50),
        itl_p90_s=percentile(gaps, 90),
        itl_p99_s=percentile(gaps, 99),
        itl_max_s=max(gaps, default=None),
        e2e_p50_s=percentile(e2e, 50),
        e2e_p90_s=percentile(e2e, 90),
        e2e_p99_s=percentile(e2e, 99),
        first_error=errors[0].error if errors else None,
    )
