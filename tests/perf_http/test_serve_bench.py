"""`lamina bench serve` end to end against the real app over a SleepRunner (seconds)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from pathlib import Path

import pytest

from app.bench import serve_bench
from app.bench.serve_bench import parse_args, parse_variant, run_level, run_variants
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


def test_a_variant_is_a_name_and_environment_settings():
    assert parse_variant("bf16:LAMINA_WEIGHT_DTYPE=bfloat16,LAMINA_THREADS=2") == (
        "bf16",
        {"LAMINA_WEIGHT_DTYPE": "bfloat16", "LAMINA_THREADS": "2"},
    )
    for malformed in ("bf16", "bf16:", ":LAMINA_THREADS=2", "bf16:LAMINA_THREADS"):
        with pytest.raises(ValueError, match="NAME:VAR=VALUE"):
            parse_variant(malformed)


def test_spawned_variants_run_every_level_in_turn(sleep_server, monkeypatch, capsys):
    """--spawn-variant starts one server per variant with its settings (here each one
    stands for the sleep server), all before the first level, then runs each level on
    every server in turn."""
    url, _ = sleep_server
    started: list[dict[str, str]] = []

    @contextlib.contextmanager
    def fake_spawned_server(kind, extra_env=None):
        assert kind == "lamina"
        started.append(extra_env)
        yield url

    monkeypatch.setattr(serve_bench, "spawned_server", fake_spawned_server)
    args = bench_args("--concurrency", "1,2", "--spawn-variant", "fp32:LAMINA_WEIGHT_DTYPE=float32")
    args.spawn_variant.append("bf16:LAMINA_WEIGHT_DTYPE=bfloat16")
    runs = run_variants(args)
    assert started == [{"LAMINA_WEIGHT_DTYPE": "float32"}, {"LAMINA_WEIGHT_DTYPE": "bfloat16"}]
    assert [run.name for run in runs] == ["fp32", "bf16"]
    assert all([level.concurrency for level in run.levels] == [1, 2] for run in runs)
    assert all(level.num_errors == 0 for run in runs for level in run.levels)
    printed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert printed == ["fp32", "bf16", "fp32", "bf16"]  # level 1 on both, then level 2
