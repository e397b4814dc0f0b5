"""`lamina bench engine --model PATH` runs every native family and the generic backend (a
smoke run on the tiny models, one of them with the transformers baseline beside it; the
figures are for people, not assertions)."""

from __future__ import annotations

import functools

import pytest

from app.bench import engine_bench
from app.bench.engine_bench import main
from app.bench.flops import measure_matmul_peak
from tests.families.conftest import ENGINE_FAMILIES

# One generic-backend model is enough: the bench sees the backend, not the architecture.
BENCHED = [family for family in ENGINE_FAMILIES if family != "granite"]


@pytest.mark.parametrize("family", BENCHED)
def test_bench_engine_runs_the_family(family_model_paths, family, capsys, monkeypatch):
    # The matmul ceiling is the machine's, not the family's (tests/perf measures it in
    # full): a short measurement keeps this smoke run short.
    quick_peak = functools.partial(measure_matmul_peak, seconds=0.1)
    monkeypatch.setattr(engine_bench, "measure_matmul_peak", quick_peak)
    argv = ["--model", str(family_model_paths[family]), "--concurrency", "2"]
    argv += ["--num-prompts", "2", "--prompt-len", "24", "--output-len", "4"]
    with_baseline = family == "qwen2"  # transformers runs every family in the parity tests
    assert main(argv if with_baseline else [*argv, "--no-baseline"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 1 and rows[0][0] == "2" and float(rows[0][2]) > 0
    if with_baseline:
        assert float(rows[0][5]) > 0  # transformers' tok/s beside lamina's
