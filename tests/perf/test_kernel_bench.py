"""`lamina bench kernels` runs end to end and prints both comparisons (a smoke run: two
layers, one repetition; the figures themselves are for people, not assertions)."""

from __future__ import annotations

import pytest

from app.bench.kernel_bench import linear_shapes, main
from app.model.families import read_model_config
from app.native.build import find_compiler, runnable_levels


def test_linear_shapes_cover_one_forward(default_model_path):
    config = read_model_config(default_model_path)
    shapes = linear_shapes(config)
    assert len(shapes) == 4 * config.num_layers + 1
    assert shapes[0] == (config.hidden_size, config.q_size + 2 * config.kv_size)
    assert shapes[-1] == (config.hidden_size, config.vocab_size)


def test_bench_kernels_prints_every_table(native, capsys):
    argv = ["--rows", "1,3", "--seqs", "2", "--context", "40", "--prefill", "30"]
    argv += ["--repeats", "1", "--layers", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "matmuls of one forward (9 matmuls, fp32)" in out and "FMA peak" in out
    assert "over the fastest other" in out and "attention, all 2 layers" in out
    matmul_rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in matmul_rows] == ["1", "3", "1", "3"]  # fp32, then bf16 weights
    assert all(float(value) > 0 for r in matmul_rows for value in r[1:4])
    assert "matmuls of one forward with bf16 (" in out and "int8 and int4 weights" in out
    assert "bf16 " in out and "int8 " in out
    assert "decode 2 x 40 keys" in out and "prefill 30 tokens" in out


def test_bench_kernels_compares_instruction_set_levels(capsys):
    """`--isa` runs each level's library side by side, each against its own FMA peak, with
    fp32, bf16, int8 and int4 weights."""
    levels = runnable_levels()[::-1]  # e.g. x86-64-v3, x86-64-v4, native
    if find_compiler() is None:
        pytest.skip("no C compiler to build the levels with")
    argv = ["--isa", ",".join(levels), "--rows", "2", "--seqs", "1", "--context", "20"]
    argv += ["--prefill", "", "--repeats", "1", "--layers", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for level in levels:
        assert f"\n{level}: " in out  # the library's line: level, compiler, file
    fp32_row, bf16_row = [line for line in out.splitlines() if line.strip().startswith("2 ")]
    assert fp32_row.count("of its FMA peak") == len(levels)
    assert f"{levels[0]} speed-up" in out
    assert bf16_row.count("int8 ") == len(levels)  # bf16 and int8: every level too
    header = next(line for line in out.splitlines() if line.endswith("speed-up over fp32"))
    assert all(f"{level} bf16" in header and f"{level} int8" in header for level in levels)


def test_bench_kernels_names_a_level_it_cannot_build(capsys):
    assert main(["--isa", "x86-64-v9", "--layers", "1"]) == 1
    assert "native kernels for --isa x86-64-v9" in capsys.readouterr().out
