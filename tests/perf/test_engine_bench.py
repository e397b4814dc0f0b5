"""`lamina bench engine` runs end to end, with its transformers baseline (a smoke run:
two short prompts; the figures themselves are for people, not assertions)."""

from __future__ import annotations

import json

import pytest

from app.bench.engine_bench import main


def table_rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]


def test_bench_engine_prints_lamina_beside_transformers(tmp_path, capsys):
    results = tmp_path / "engine.json"
    argv = ["--concurrency", "2", "--num-prompts", "2", "--prompt-len", "16"]
    argv += ["--output-len", "8", "--json", str(results)]
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


def test_bench_engine_says_which_kernels_ran(native, capsys):
    """Two weight precisions side by side (one engine each, alternating), then the
    per-op path."""
    argv = ["--concurrency", "1", "--num-prompts", "1", "--prompt-len", "8"]
    argv += ["--output-len", "4", "--no-baseline"]
    assert main([*argv, "--weight-dtype", "float32,bfloat16", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "weights float32: matmuls in torch.float32, kernels=native, fused layers" in out
    assert "weights bfloat16: matmuls in torch.bfloat16, kernels=native, fused layers" in out
    assert "FMA peak" in out and "best of 2" in out
    rows = table_rows(out)
    assert [(r[0], r[1]) for r in rows] == [("1", "float32"), ("1", "bfloat16")]
    assert all(r[4].endswith("%") for r in rows)  # the share of the FMA peak
    assert any(line.startswith("bfloat16 / float32 tok/s: 1: ") for line in out.splitlines())
    assert main([*argv, "--no-fused-layers"]) == 0
    assert "kernels=native, one op at a time" in capsys.readouterr().out
