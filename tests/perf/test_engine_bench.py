"""`lamina bench engine` runs end to end, with its transformers baseline (a smoke run:
two short prompts; the figures themselves are for people, not assertions).

The model is the tests' tiny random LLaMA: what is checked here is the bench's own work
(its table, its JSON, which kernels it says ran), the same code whatever the model, and
the default model's three loads made this file ~60 s of the suite.
"""

from __future__ import annotations

import functools
import json

import pytest

from app.bench import engine_bench
from app.bench.engine_bench import main
from app.bench.flops import measure_matmul_peak


def table_rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]


def test_bench_engine_prints_lamina_beside_transformers(tiny_model_path, tmp_path, capsys):
    results = tmp_path / "engine.json"
    argv = ["--model", str(tiny_model_path), "--concurrency", "2", "--num-prompts", "2"]
    argv += ["--prompt-len", "16", "--output-len", "8", "--json", str(results)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "transformers tok/s" in out and "MFU = useful model FLOPs" in out
    (row,) = table_rows(out)
    concurrency, weights, lamina, mfu, fma_share, baseline, ratio = row
    assert concurrency == "2" and weights == "auto" and float(lamina) > 0 and float(baseline) > 0
    (saved,) = json.loads(results.read_text())
    assert saved["output_tokens"] == 2 * 8 and saved["num_requests"] == 2
    # The table rounds; the saved figures are exact and give the printed ratio.
    assert saved["ratio"] == pytest.approx(saved["lamina_tok_s"] / saved["baseline_tok_s"])
    assert float(ratio) == pytest.approx(saved["ratio"], abs=0.005)
    assert float(lamina) == pytest.approx(saved["lamina_tok_s"], abs=0.05)


def test_bench_engine_says_which_kernels_ran(native, tiny_model_path, capsys, monkeypatch):
    """Two weight precisions side by side (one engine each, alternating), then the
    per-op path."""
    # The matmul ceiling in full (2 s per dtype) is the test above's: the kernels' names
    # are what this one reads.
    quick_peak = functools.partial(measure_matmul_peak, seconds=0.1)
    monkeypatch.setattr(engine_bench, "measure_matmul_peak", quick_peak)
    argv = ["--model", str(tiny_model_path), "--concurrency", "1", "--num-prompts", "1"]
    argv += ["--prompt-len", "8", "--output-len", "4", "--no-baseline"]
    assert main([*argv, "--weight-dtype", "float32,bfloat16", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "weights float32: matmuls in float32, kernels=native, fused layers" in out
    assert "weights bfloat16: matmuls in bfloat16, kernels=native, fused layers" in out
    assert "FMA peak" in out and "best of 2" in out
    rows = table_rows(out)
    assert [(r[0], r[1]) for r in rows] == [("1", "float32"), ("1", "bfloat16")]
    assert all(r[4].endswith("%") for r in rows)  # the share of the FMA peak
    assert any(line.startswith("bfloat16 / float32 tok/s: 1: ") for line in out.splitlines())
    assert main([*argv, "--no-fused-layers"]) == 0
    assert "kernels=native, one op at a time" in capsys.readouterr().out
