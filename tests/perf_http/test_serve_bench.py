"""`lamina bench serve` end to end against the real app over a SleepRunner (seconds)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest

from app.bench.serve_bench import parse_args, run_level
from app.bench.serve_client import RequestRecord
from app.bench.serve_stats import percentile, summarize
from app.config import Settings
from app.engine.engine import Engine
from app.main import LoadedEngine, create_app
from app.tokenizer import Tokenizer
from tests.api.conftest import ThreadedServer
from tests.perf_http.sleep_runner import SAMPLE_TEXT, SleepRunner


@pytest.fixture(scope="module")
def sleep_server(default_model_path: Path):
    tokenizer = Tokenizer(default_model_path)
    runner = SleepRunner(tokenizer.encode(SAMPLE_TEXT, add_special_tokens=False), fixed_s=0.002)
    settings = Settings(model=default_model_path, warmup=False)
    engine = Engine(runner, tokenizer, settings)
    app = create_app(settings, loader=lambda _s: LoadedEngine(engine, tokenizer, "cpu"))
    with ThreadedServer(app) as server:
        yield server.url, runner


def bench_args(*extra: str) -> argparse.Namespace:
    base = ["--prompt-len", "16", "--output-len", "8", "--requests-per-client", "2"]
    return parse_args([*base, *extra])


def test_a_level_counts_every_token_and_gap(sleep_server):
    url, _ = sleep_server
    summary = asyncio.run(run_level(url, "smollm2-135m-instruct", 3, bench_args()))
    assert (summary.num_requests, summary.num_errors) == (6, 0)
    assert summary.output_tok_s * summary.duration_s == pytest.approx(6 * 8)
    assert summary.itl_p50_s <= summary.itl_p99_s <= summary.itl_max_s
    assert summary.num_long_requests == 0


def test_long_prompt_arrivals_are_reported_apart(sleep_server):
    url, runner = sleep_server
    args = bench_args(
        "--long-prompt-len", "300", "--long-prompt-rate", "100", "--long-prompt-count", "3"
    )
    num_steps = runner.num_steps
    summary = asyncio.run(run_level(url, "smollm2-135m-instruct", 2, args))
    assert (summary.num_long_requests, summary.num_long_errors) == (3, 0)
    assert summary.long_ttft_p50_s is not None
    assert summary.output_tok_s * summary.duration_s == pytest.approx(4 * 8)  # streams only
    assert max(runner.step_tokens[num_steps:]) >= 256  # the long prompts did reach the engine
    assert "3 long-prompt requests" in summary.long_prompts_row()


def test_percentiles_and_errors():
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    records = [
        RequestRecord(ok=True, ttft_s=0.1, e2e_s=1.0, output_tokens=3, chunk_gaps_s=[0.2, 0.4]),
        RequestRecord(ok=False, error="HTTP 429: busy"),
    ]
    summary = summarize(2, records, duration_s=2.0)
    assert (summary.num_errors, summary.first_error) == (1, "HTTP 429: busy")
    assert summary.output_tok_s == pytest.approx(1.5)
    assert summary.itl_max_s == pytest.approx(0.4)
