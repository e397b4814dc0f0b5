"""lamina's compiled CPU kernels (app/native): results, batch invariance, the build cache."""

from __future__ import annotations

import ctypes
import math

import pytest
import torch
import torch.nn.functional as F

from app.native import NativeKernels, native_kernels
from app.native import build as native_build
from app.native.load import AMX_LOG
from app.native.panels import (
    INT4,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantized_rows,
    unpack_int4,
)
from app.native.self_check import check_library, dense_causal_attention


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- matmul ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows, in_features, out_features",
    [(1, 576, 960), (7, 1536, 576), (33, 576, 100), (5, 13, 7), (2, 1, 64), (6, 64, 16)],
)
def test_matmul_computes_the_linear_map(kernels, rows, in_features, out_features):
    x, weight = randn(rows, in_features), randn(out_features, in_features, seed=1)
    bias = randn(out_features, seed=2)
    panels = kernels.pack_weight(weight)
    assert panels.shape == (math.ceil(out_features / 64), in_features, 64)
    expected = F.linear(x.double(), weight.double(), bias.double()).float()
    tolerance = 1e-5 * math.sqrt(in_features)
    torch.testing.assert_close(
        kernels.matmul(x, panels, bias, out_features), expected, atol=tolerance, rtol=1e-5
    )
    torch.testing.assert_close(
        kernels.matmul(x, panels, None, out_features), expected - bias, atol=tolerance, rtol=1e-5
    )


def test_matmul_reads_strided_rows_and_handles_no_rows(native):
    wide = randn(4, 200)
    x = wide[:, 10:106]  # rows 200 floats apart
    weight = randn(80, 96, seed=1)
    panels = native.pack_weight(weight)
    assert torch.equal(
        native.matmul(x, panels, None, 80), native.matmul(x.contiguous(), panels, None, 80)
    )
    assert native.matmul(x[:0], panels, None, 80).shape == (0, 80)
    with pytest.raises(ValueError, match="features"):
        native.matmul(randn(2, 95), panels, None, 80)
    with pytest.raises(ValueError, match="fp32"):
        native.matmul(x.double(), panels, None, 80)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8, INT4])
@pytest.mark.parametrize("threads", [1, 2])
def test_matmul_rows_have_the_same_bits_whatever_the_row_count(kernels, threads, dtype):
    """Batch invariance by construction: no row count, thread count or column split
    changes a row's bits (each element sums its products in the same order; bf16 panels
    too, whose rows are rounded to bf16 first)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, weight = randn(130, 1536), randn(576, 1536, seed=1)
        panels = kernels.pack_weight(weight, dtype=dtype)
        alone = torch.cat([kernels.matmul(x[i : i + 1], panels, None, 576) for i in range(130)])
        for rows in (2, 3, 5, 6, 7, 13, 32, 49, 70, 97, 130):  # rows split past 48
            assert torch.equal(kernels.matmul(x[:rows], panels, None, 576), alone[:rows]), rows
            assert torch.equal(kernels.matmul(x[-rows:], panels, None, 576), alone[-rows:]), rows
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8, INT4])
def test_matmul_bits_do_not_depend_on_the_thread_count(kernels, dtype):
    x, weight = randn(9, 576), randn(960, 576, seed=1)
    panels = kernels.pack_weight(weight, dtype=dtype)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.matmul(x, panels, None, 960)
        torch.set_num_threads(2)
        two = kernels.matmul(x, panels, None, 960)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, two)


# --- paged attention ---------------------------------------------------------------------

HEADS, KV_HEADS, BLOCK, NUM_BLOCKS = 9, 3, 16, 40


def cache_with(keys: torch.Tensor, values: torch.Tensor, table: list[int], head_dim: int):
    """A junk-filled cache [KV_HEADS, NUM_BLOCKS, BLOCK, dim] with a sequence's keys and
    values ([L, KV_HEADS, dim]) at the slots its table names."""
    key_cache, value_cache = randn(2, KV_HEADS, NUM_BLOCKS, BLOCK, head_dim, seed=9).unbind(0)
    key_cache, value_cache = key_cache.contiguous(), value_cache.contiguous()
    for pos in range(keys.shape[0]):
        key_cache[:, table[pos // BLOCK], pos % BLOCK] = keys[pos]
        value_cache[:, table[pos // BLOCK], pos % BLOCK] = values[pos]
    return key_cache, value_cache


def dense_causal(query, keys, values, first_pos, scale):
    """query [T, HEADS, D] at positions first_pos..; keys/values [L, KV_HEADS, D]; in fp64."""
    out = dense_causal_attention(query.double(), keys.double(), values.double(), first_pos, scale)
    return out.reshape(query.shape[0], -1)


def int32(values):
    return torch.tensor(values, dtype=torch.int32)


def chunk_after_prefix(length: int, first: int, head_dim: int):
    """Keys 0..length-1 in 10 scattered blocks of the cache, and the queries of positions
    first..length-1: (keys, values, key_cache, value_cache, block table, query)."""
    table = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(3))[:10].tolist()
    keys, values = (
        randn(length, KV_HEADS, head_dim, seed=4),
        randn(length, KV_HEADS, head_dim, seed=5),
    )
    key_cache, value_cache = cache_with(keys, values, table, head_dim)
    query = randn(length - first, HEADS, head_dim, seed=6)
    return keys, values, key_cache, value_cache, table, query


@pytest.mark.parametrize("head_dim", [64, 8, 24])
def test_attention_matches_dense_causal_attention(kernels, head_dim):
    length, first = 150, 120  # keys 0..149; queries at 120..149 (a chunk after a prefix)
    keys, values, key_cache, value_cache, table, query = chunk_after_prefix(length, first, head_dim)
    scale = head_dim**-0.5
    out = kernels.paged_attention(
        query, key_cache, value_cache, int32([table]), int32([0] * (length - first)),
        int32(range(first + 1, length + 1)), scale,
    )  # fmt: skip
    torch.testing.assert_close(
        out.double(), dense_causal(query, keys, values, first, scale), atol=2e-6, rtol=1e-5
    )


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"),
    [(9, 3, 64), (4, 1, 64), (8, 1, 64), (2, 2, 128), (6, 2, 24)],
)
def test_decode_steps_match_dense_attention_for_any_head_grouping(
    kernels, heads, kv_heads, head_dim
):
    """Decode tokens of sequences of different lengths in one step, over scattered
    blocks: a group of up to 4 query heads is computed as one tile's rows, a larger one
    head by head, and each thread prefetches its next item, for a context past the
    prefetch's 64 blocks (1100 keys) too."""
    lengths, block = [1100, 37, 1, 300], 16
    per_seq = [math.ceil(n / block) for n in lengths]
    num_blocks = sum(per_seq) + 7
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(2)).tolist()
    tables, used = [], 0
    for n in per_seq:
        tables.append(order[used : used + n] + [0] * (max(per_seq) - n))
        used += n
    key_cache, value_cache = randn(2, kv_heads, num_blocks, block, head_dim, seed=3).unbind(0)
    key_cache, value_cache = key_cache.contiguous(), value_cache.contiguous()
    query = randn(len(lengths), heads, head_dim, seed=4)
    scale = head_dim**-0.5
    out = kernels.paged_attention(
        query, key_cache, value_cache, int32(tables), int32(range(len(lengths))),
        int32(lengths), scale,
    )  # fmt: skip
    for seq, length in enumerate(lengths):
        slots = [tables[seq][pos // block] * block + pos % block for pos in range(length)]
        keys = key_cache.flatten(1, 2)[:, slots].transpose(0, 1)  # [length, kv_heads, dim]
        values = value_cache.flatten(1, 2)[:, slots].transpose(0, 1)
        expected = dense_causal_attention(
            query[seq : seq + 1].double(), keys.double(), values.double(), length - 1, scale
        )
        torch.testing.assert_close(
            out[seq].double(), expected.reshape(-1), atol=2e-6, rtol=1e-5, msg=f"seq {seq}"
        )


def test_attention_takes_strided_queries_and_a_softmax_of_wide_range(kernels):
    """Queries as views into the fused qkv rows; scores spanning ~100 (exp underflow)."""
    head_dim, length = 64, 40
    table = list(range(3))
    keys, values = (
        randn(length, KV_HEADS, head_dim, seed=4) * 6,
        randn(length, KV_HEADS, head_dim, seed=5),
    )
    key_cache, value_cache = cache_with(keys, values, table, head_dim)
    qkv = randn(length, (HEADS + 2 * KV_HEADS) * head_dim, seed=6) * 6
    query = qkv[:, : HEADS * head_dim].view(length, HEADS, head_dim)
    out = kernels.paged_attention(
        query,
        key_cache,
        value_cache,
        int32([table]),
        int32([0] * length),
        int32(range(1, length + 1)),
        0.125,
    )
    torch.testing.assert_close(
        out.double(), dense_causal(query, keys, values, 0, 0.125), atol=1e-5, rtol=1e-5
    )


def test_attention_bits_depend_on_the_token_only(kernels):
    """A token's output is bit-identical computed alone, in a prefill chunk, or among
    other sequences' tokens: no padding, no grouping, in key order."""
    head_dim, lengths = 64, [70, 33, 5]
    tables = [list(range(0, 5)), list(range(5, 8)), list(range(8, 9))]
    key_cache, value_cache = randn(2, KV_HEADS, NUM_BLOCKS, BLOCK, head_dim, seed=1).unbind(0)
    key_cache, value_cache = key_cache.contiguous(), value_cache.contiguous()
    queries = [randn(n, HEADS, head_dim, seed=10 + i) for i, n in enumerate(lengths)]
    padded_tables = int32([t + [0] * (5 - len(t)) for t in tables])

    def attend(tokens):  # tokens: (seq, position) pairs, one step
        query = torch.stack([queries[s][p] for s, p in tokens])
        return kernels.paged_attention(
            query, key_cache, value_cache, padded_tables, int32([s for s, _ in tokens]),
            int32([p + 1 for _, p in tokens]), 0.125,
        )  # fmt: skip

    everything = [(s, p) for s, n in enumerate(lengths) for p in range(n)]
    together = attend(everything)
    for row, token in enumerate(everything):
        assert torch.equal(attend([token])[0], together[row]), token


@pytest.mark.parametrize("vocab", [1, 7, 16, 17, 100, 49152])
def test_argmax_rows_equals_torch_argmax(kernels, vocab):
    """First index of the largest value, ties and infinities included, for any row
    length around the 16-lane vector (the tail after the last whole vector too)."""
    logits = randn(33, vocab, seed=vocab)
    logits[1] = 0.0  # all tied: index 0
    logits[2] = float("-inf")  # all masked: index 0, as torch gives
    if vocab > 3:
        logits[3, [2, vocab - 1]] = 50.0  # a tie between the first vector and the tail
        logits[4, vocab - 1] = float("inf")
        logits[5] = torch.where(logits[5] > 0, -0.0, 0.0)  # zeros of both signs
    rounded = (logits * 2).round() / 2  # many exact ties in every row
    for x in (logits, rounded, rounded[:, : max(1, vocab - 3)]):  # the last: strided rows
        assert torch.equal(kernels.argmax_rows(x), x.argmax(dim=-1))
    assert kernels.argmax_rows(torch.empty(0, vocab)).shape == (0,)


def test_the_fma_peak_is_a_positive_rate(kernels):
    """The benchmarks' arithmetic ceiling: register-only FMAs, timed (no assertion on its
    size, which depends on the machine and its load)."""
    peak = kernels.fma_peak(seconds=0.03)
    assert math.isfinite(peak) and peak > 0


# --- every build ---------------------------------------------------------------------------


def test_every_build_passes_the_start_up_self_check(kernels):
    check_library(kernels)


def test_the_kernels_use_torchs_thread_count_whatever_their_openmp_runtime(kernels):
    """A gcc build shares torch's libgomp; a clang build has LLVM's runtime, which follows
    torch.set_num_threads before each call (so the thread-count tests test something)."""
    runtime_threads = ctypes.CDLL(str(kernels.path)).omp_get_max_threads
    x, weight = randn(2, 64), randn(64, 64, seed=1)
    panels = kernels.pack_weight(weight)
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            kernels.matmul(x, panels, None, 64)
            assert runtime_threads() == threads
    finally:
        torch.set_num_threads(previous)


# --- building and caching ------------------------------------------------------------------


def test_the_library_is_cached_per_source_compiler_and_cpu(tmp_path, monkeypatch):
    if native_build.find_compiler() is None:
        pytest.skip("no C compiler")
    # A one-function source: the caching is under test, not kernels.c (every test that
    # loads the kernels compiles that for real), and -O3 on it costs seconds of CPU.
    source = tmp_path / "src" / "kernels.c"
    source.parent.mkdir()
    source.write_text("int lamina_cache_probe(void) { return 1; }\n")
    monkeypatch.setattr(native_build, "SOURCE", source)
    cache = tmp_path / "cache"
    first = native_build.build_library(cache).path
    assert first.parent == cache and first.name.startswith("lamina-kernels-")
    built_at = first.stat().st_mtime_ns
    assert native_build.build_library(cache).path == first
    assert first.stat().st_mtime_ns == built_at  # reused, not rebuilt
    assert [p.name for p in cache.iterdir()] == [first.name]  # no temporary files left


def test_an_edit_to_any_part_of_the_source_is_a_new_library(tmp_path, monkeypatch):
    """kernels.c includes its parts (vector.h, matmul.h, ...): the cache key covers them all."""
    compiler = native_build.find_compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    source_dir = tmp_path / "src"
    source_dir.mkdir()
    for part in [native_build.SOURCE, *native_build.SOURCE.parent.glob("*.h")]:
        (source_dir / part.name).write_bytes(part.read_bytes())
    assert {p.name for p in source_dir.glob("*.h")} >= {"vector.h", "matmul.h", "attention.h"}
    monkeypatch.setattr(native_build, "SOURCE", source_dir / "kernels.c")
    before = native_build.library_path(compiler, tmp_path)
    attention = source_dir / "attention.h"
    attention.write_text(attention.read_text() + "\n/* an edit */\n")
    assert native_build.library_path(compiler, tmp_path) != before


def test_without_a_compiler_a_portable_build_for_this_cpu_is_loaded(tmp_path, monkeypatch):
    """What the Docker runtime image does: no gcc, libraries built in an earlier stage."""
    if native_build.find_compiler() is None:
        pytest.skip("no C compiler to make the portable builds with")
    built = native_build.build_portable(tmp_path)
    if not built:
        pytest.skip("no portable CPU levels known for this machine kind")
    monkeypatch.setattr(native_build, "find_compiler", lambda: None)
    monkeypatch.setattr(native_build, "PREBUILT_DIR", tmp_path)
    chosen = native_build.build_library(tmp_path / "cache")
    assert chosen.path in built and chosen.prebuilt
    assert chosen.level == native_build.runnable_levels()[1]  # the best portable one
    kernels = NativeKernels(chosen)
    x, weight = randn(3, 100), randn(70, 100, seed=1)
    got = kernels.matmul(x, kernels.pack_weight(weight), None, 70)
    torch.testing.assert_close(got, x @ weight.T, atol=1e-4, rtol=1e-4)
    monkeypatch.setattr(native_build, "PREBUILT_DIR", tmp_path / "empty")
    with pytest.raises(native_build.NativeBuildError, match="no C compiler"):
        native_build.build_library(tmp_path / "cache")


def test_the_start_up_log_says_which_kernels_run_and_why(tmp_path, monkeypatch, caplog):
    """Compiled here (level, compiler, OpenMP runtime), a prebuilt library (and why none
    was compiled), or torch's kernels (and why neither)."""
    compiler = native_build.find_compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    with caplog.at_level("INFO", logger="app.native"):
        compiled = native_kernels.__wrapped__()
    assert compiled is not None
    label = native_build.compiler_label(compiler)
    assert f"native kernels ready: -march=native for {native_build._cpu_model()}" in caplog.text
    assert f"built by {label} (lamina-kernels-" in caplog.text
    assert f"; AMX tiles: {AMX_LOG[compiled.amx_status]}" in caplog.text
    built = native_build.build_portable(tmp_path)
    if not built:
        pytest.skip("no portable CPU levels known for this machine kind")
    monkeypatch.setattr(native_build, "find_compiler", lambda: None)
    monkeypatch.setattr(native_build, "PREBUILT_DIR", tmp_path)
    caplog.clear()
    with caplog.at_level("INFO", logger="app.native"):
        assert native_kernels.__wrapped__() is not None
    best = native_build.runnable_levels()[1]
    assert f"native kernels ready: prebuilt {best} library lamina-kernels-" in caplog.text
    assert "(not compiled here: no C compiler found (set CC or install gcc))" in caplog.text
    monkeypatch.setattr(native_build, "PREBUILT_DIR", tmp_path / "empty")
    caplog.clear()
    with caplog.at_level("INFO", logger="app.native"):
        assert native_kernels.__wrapped__() is None
    assert (
        "native kernels unavailable (no C compiler found (set CC or install gcc); "
        f"no prebuilt library for this CPU in {tmp_path / 'empty'}): using torch's kernels"
    ) in caplog.text


def test_a_missing_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(native_build.NativeBuildError, match="no C compiler"):
        native_build.build_library()


def test_a_failing_compile_says_why(tmp_path, monkeypatch):
    if native_build.find_compiler() is None:
        pytest.skip("no C compiler")
    broken = tmp_path / "kernels.c"
    broken.write_text("this is not C;\n")
    monkeypatch.setattr(native_build, "SOURCE", broken)
    with pytest.raises(native_build.NativeBuildError, match="error"):
        native_build.build_library(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-written left


def test_an_unwritable_cache_falls_back_to_a_shipped_build(tmp_path, monkeypatch):
    """A read-only home in a container: compile fails, a portable build still serves."""
    if native_build.find_compiler() is None:
        pytest.skip("no C compiler")
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    unwritable = blocker / "cache"  # mkdir fails: its parent is a file
    monkeypatch.setattr(native_build, "PREBUILT_DIR", tmp_path / "none")
    with pytest.raises(native_build.NativeBuildError, match="cannot create"):
        native_build.build_library(unwritable)
    built = native_build.build_portable(tmp_path / "prebuilt")
    if not built:
        pytest.skip("no portable CPU levels known for this machine kind")
    monkeypatch.setattr(native_build, "PREBUILT_DIR", tmp_path / "prebuilt")
    assert native_build.build_library(unwritable).path in built


def test_a_library_that_computes_wrong_results_is_refused(native, monkeypatch, caplog):
    import app.native.load as native_module
    from app.native.self_check import check_library

    broken = NativeKernels(native.build)
    monkeypatch.setattr(broken, "paged_attention", lambda *args: torch.zeros(21, 64))
    with pytest.raises(AssertionError, match="attention disagrees"):
        check_library(broken)
    broken = NativeKernels(native.build)
    monkeypatch.setattr(broken, "decoder_stack", lambda *args: None)  # leaves x as it was
    with pytest.raises(AssertionError, match="decoder stack disagrees"):
        check_library(broken)
    check_library(NativeKernels(native.build))  # the real one passes

    def failing_check(kernels):
        raise AssertionError("the native matmul disagrees with torch")

    monkeypatch.setattr(native_module, "check_library", failing_check)
    with caplog.at_level("WARNING", logger="app.native"):
        assert native_module.native_kernels.__wrapped__() is None  # torch's kernels serve
    assert "native kernels unavailable" in caplog.text


def test_fp16_panels_sum_in_fp32_with_the_same_bits_for_any_row_count(kernels):
    x, weight = randn(9, 1536), randn(100, 1536, seed=1)
    panels = kernels.pack_weight(weight, dtype=torch.float16)
    assert panels.dtype == torch.float16 and panels.shape == (2, 1536, 64)
    expected = (x.double() @ weight.half().double().T).float()
    out = kernels.matmul(x, panels, None, 100)
    torch.testing.assert_close(out, expected, atol=1e-5 * math.sqrt(1536), rtol=1e-5)
    alone = torch.cat([kernels.matmul(x[i : i + 1], panels, None, 100) for i in range(9)])
    assert torch.equal(alone, out)
    with pytest.raises(ValueError, match="float32, float16, bfloat16, int8 or int4"):
        kernels.pack_weight(weight, dtype=torch.float64)


# --- bf16 weights --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows, in_features, out_features",
    [(1, 576, 960), (7, 1536, 576), (33, 576, 100), (5, 13, 7), (2, 1, 64), (50, 64, 16)],
)
def test_bf16_matmul_is_the_exact_product_of_the_rounded_inputs_summed_in_fp32(
    kernels, rows, in_features, out_features
):
    """bf16 panels in K-pairs (odd K: a half-empty last pair) against fp64 of the inputs
    rounded to bf16: a bf16 x bf16 product is exact in fp32, so the only error is fp32's
    in the K + 1 additions (bias included), at most (K + 1) u of the absolute sum."""
    x, weight = randn(rows, in_features), randn(out_features, in_features, seed=1)
    bias = randn(out_features, seed=2)
    panels = kernels.pack_weight(weight, dtype=torch.bfloat16)
    assert panels.dtype == torch.bfloat16
    assert panels.shape == (math.ceil(out_features / 64), math.ceil(in_features / 2), 64, 2)
    rounded_x, rounded_w = x.bfloat16().double(), weight.bfloat16().double()
    expected = rounded_x @ rounded_w.T + bias.double()
    bound = (in_features + 1) * 2.0**-24 * (rounded_x.abs() @ rounded_w.abs().T + bias.abs())
    error = (kernels.matmul(x, panels, bias, out_features).double() - expected).abs()
    assert (error <= bound).all(), (error - bound).max()


def test_bf16_rounds_to_nearest_even_and_flushes_denormals(kernels):
    """Activations and weights round as torch's .bfloat16() does (ties to even), except
    that denormals become zero (AVX512-BF16 reads them as zero anyway)."""
    ties = [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.0, 2**-126, 2**-127]  # last: denormal
    rounded = [1.0, 1 + 2**-6, -1.0, 3.0, 2**-126, 0.0]
    x = torch.tensor([ties * 3])  # 18 values: a whole vector of 16 and a scalar tail
    one = torch.eye(18)  # y = x . I^T: each output is one rounded input, exactly
    out = kernels.matmul(x, kernels.pack_weight(one, dtype=torch.bfloat16), None, 18)
    assert out[0].tolist() == rounded * 3
    normal = [i for i in range(18) if i % 6 != 5]
    assert out[0, normal].tolist() == x[0, normal].bfloat16().float().tolist()
    weight = torch.tensor([[1 + 2**-8, 2**-130], [-(2**-127), 1 + 3 * 2**-8]])
    panels = kernels.pack_weight(weight, dtype=torch.bfloat16)  # [1, 1, 64, 2]
    pairs = panels[0, 0, :2].float()  # column n: (w[n, 0], w[n, 1])
    assert pairs.tolist() == [[1.0, 0.0], [-0.0, 1 + 2**-6]]
    assert math.copysign(1.0, pairs[1, 0].item()) == -1.0  # a zero of the denormal's sign


def test_bf16_bits_are_the_same_on_every_build(kernels, native):
    """Builds without AVX512-BF16 (x86-64-v4 and v3, any CPU without it) widen the bf16
    panels and write out VDPBF16PS's two FMAs (odd k first); a native build on a CPU with
    the instruction uses it. Every build gives the native build's bits for normal inputs.
    Where the instruction flushes a denormal partial sum to zero, the FMAs keep it: the
    one known difference. (With AMX tiles for bf16 in use, the native build's bits differ:
    test_amx_bf16_rows_have_their_own_bits_whatever_the_row_count; both compilers' native
    builds give the same AMX bits: test_amx_bf16_bits_are_the_same_with_either_compiler.)"""
    x, weight = randn(37, 1536), randn(300, 1536, seed=1)
    native.use_amx(False)
    kernels.use_amx(False)  # a native build by the other compiler
    try:
        assert torch.equal(bf16_matmul(kernels, x, weight), bf16_matmul(native, x, weight))
    finally:
        native.use_amx(True)
        kernels.use_amx(True)
    tiny_x, tiny_w = torch.full((1, 2), 2.0**-70), torch.full((16, 2), 2.0**-70)
    expected = 0.0 if kernels.bf16_dot_product else 2 * 2.0**-140  # denormal products
    assert bf16_matmul(kernels, tiny_x, tiny_w)[0, 0].item() == expected


def bf16_matmul(kernels: NativeKernels, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    panels = kernels.pack_weight(weight, dtype=torch.bfloat16)
    return kernels.matmul(x, panels, None, weight.shape[0])


# --- int8 and 4-bit weights ------------------------------------------------------------


@pytest.mark.parametrize(
    "rows, in_features, out_features", [(1, 576, 960), (7, 1536, 576), (33, 64, 100), (50, 32, 7)]
)
def test_int8_matmul_is_the_fp32_sum_of_the_dequantized_weights(
    kernels, rows, in_features, out_features
):
    """int8 blocks: a scale per column and 32 k (largest |w| / 127), weights rounded to the
    nearest step; the rows are quantized per block of 32 too, each block's dot product is
    an exact integer, then one fp32 step per block: against fp64 of the dequantized
    weights and rows its error stays within fp32's for K + 1 additions (bias included)."""
    x, weight = randn(rows, in_features), randn(out_features, in_features, seed=1)
    weight[0, :32] = 0.0  # an all-zero block: scale 0
    bias = randn(out_features, seed=2)
    panels = kernels.pack_weight(weight, dtype=torch.int8)
    assert panels.dtype == torch.int8
    assert panels.shape == (math.ceil(out_features / 64), in_features // 32, 2304)
    dequantized = dequantize_int8(panels, out_features)
    blocks = weight.reshape(out_features, -1, 32)
    step = (blocks.abs().amax(-1, keepdim=True) / 127).expand_as(blocks).reshape_as(weight)
    assert ((dequantized - weight).abs() <= step / 2 * (1 + 1e-5) + 1e-30).all()
    assert dequantized[0, :32].eq(0).all()
    quantized = quantized_rows(x)
    expected = quantized @ dequantized.double().T + bias.double()
    bound = (in_features + 1) * 2.0**-24 * (quantized.abs() @ dequantized.abs().double().T)
    error = (kernels.matmul(x, panels, bias, out_features).double() - expected).abs()
    assert (error <= bound + 2.0**-24 * bias.abs().double()).all(), (error - bound).max()


@pytest.mark.parametrize(
    "rows, in_features, out_features", [(1, 576, 960), (7, 1536, 576), (33, 64, 100), (50, 32, 7)]
)
def test_int4_matmul_is_the_fp32_sum_of_the_dequantized_weights(
    kernels, rows, in_features, out_features
):
    """4-bit blocks: per column and 32 k, minimum = smallest w, scale = range / 15, q the
    nearest step; with the rows quantized per block of 32, the kernel's sum of x[k] *
    (q * scale + minimum) is the fp64 one within fp32's error."""
    x, weight = randn(rows, in_features), randn(out_features, in_features, seed=1)
    weight[0, :32] = 0.25  # a constant block: scale 0, every weight its minimum exactly
    bias = randn(out_features, seed=2)
    panels = kernels.pack_weight(weight, dtype=INT4)
    assert panels.dtype == INT4
    assert panels.shape == (math.ceil(out_features / 64), in_features // 32, 1536)
    dequantized = dequantize_int4(panels, out_features)
    blocks = weight.reshape(out_features, -1, 32)
    spread = blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)
    step = (spread / 15).expand_as(blocks).reshape_as(weight)
    assert ((dequantized - weight).abs() <= step / 2 * (1 + 1e-4) + 1e-6).all()
    assert dequantized[0, :32].eq(0.25).all()
    quantized = quantized_rows(x)
    expected = quantized @ dequantized.double().T + bias.double()
    bound = (in_features + 1) * 2.0**-24 * (quantized.abs() @ dequantized.abs().double().T)
    error = (kernels.matmul(x, panels, bias, out_features).double() - expected).abs()
    assert (error <= bound + 2.0**-24 * bias.abs().double()).all(), (error - bound).max()


@pytest.mark.parametrize("out_features", [64, 100])
def test_int4_blocks_pack_as_the_native_packer_lays_them_out(native, out_features):
    """pack_int4 (blocks given, a GGUF file's) and the native packer (blocks quantized from
    the weight) write the same bytes for the same blocks: unpacking the native panels and
    packing them again gives them back, padding columns included."""
    weight = randn(out_features, 96, seed=1)
    weight[3, 32:64] = -0.5  # a constant block: scale 0
    panels = native.pack_weight(weight, dtype=INT4)
    blocks = unpack_int4(panels, out_features)
    assert blocks.q.shape == (out_features, 96) and blocks.scales.shape == (out_features, 3)
    assert torch.equal(pack_int4(blocks), panels)
    assert torch.equal(blocks.values(), dequantize_int4(panels, out_features))


@pytest.mark.parametrize("dtype", [torch.int8, INT4], ids=["int8", "int4"])
def test_quantized_bits_are_the_same_on_every_build(kernels, native, dtype):
    """AVX-512 builds widen 16 weights at a time, the others 8 in several walks: each
    element takes the same operations, so every build gives the native build's bits."""
    x, weight = randn(37, 1536), randn(300, 1536, seed=1)
    panels = native.pack_weight(weight, dtype=dtype)
    assert torch.equal(kernels.pack_weight(weight, dtype=dtype), panels)
    assert torch.equal(kernels.matmul(x, panels, None, 300), native.matmul(x, panels, None, 300))


def skip_without_amx(kernels: NativeKernels) -> None:
    if kernels.amx_status == "not built":
        pytest.skip("no AMX tiles in this build: no AMX-INT8 on this CPU or in its target")
    if kernels.amx_status == "refused":
        pytest.skip("the OS refused the AMX tile state (arch_prctl XTILEDATA)")


@pytest.mark.parametrize("dtype", [torch.int8, INT4], ids=["int8", "int4"])
@pytest.mark.parametrize("threads", [1, 2])
def test_amx_tiles_give_every_row_the_vnni_bits(native, threads, dtype):
    """AMX tiles (amx.h) take an int8 or 4-bit matmul's rows in 16s, the VNNI tiles the rest:
    with exact integer sums and the same fp32 steps, every row has the bits it has with
    AMX turned off, and alone, whatever the row count (a part of a tile, tiles of both
    kinds, row blocks of 48) and the thread count."""
    skip_without_amx(native)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, weight, bias = randn(130, 1536), randn(600, 1536, seed=1), randn(600, seed=2)
        x[3] *= 1e-30  # tiny scales
        x[20, :32] = 0.0  # an all-zero block: scale 0
        panels = native.pack_weight(weight, dtype=dtype)  # 600 columns: a last panel of 24
        native.use_amx(False)
        assert native.amx_status == "turned off"
        without = native.matmul(x, panels, bias, 600)
        alone = torch.cat([native.matmul(x[i : i + 1], panels, bias, 600) for i in range(130)])
        native.use_amx(True)
        assert native.amx_status == "in use"
        assert torch.equal(without, alone)
        for rows in (15, 16, 17, 31, 32, 33, 47, 48, 49, 64, 80, 97, 130):
            assert torch.equal(native.matmul(x[:rows], panels, bias, 600), without[:rows]), rows
            assert torch.equal(native.matmul(x[-rows:], panels, bias, 600), without[-rows:]), rows
    finally:
        native.use_amx(True)
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [1, 2])
def test_amx_bf16_rows_have_their_own_bits_whatever_the_row_count(native, threads):
    """bf16 on AMX tiles (amx.h) takes every row, 16 at a time, the last tile in part: a
    row's bits are the same alone as among 2..130 rows (row blocks of 48), with 1 or 2
    threads, and close to fp64's product of the rounded inputs (an odd K: a part chunk
    of K-pairs). AMX turned off, the rows take VDPBF16PS again."""
    skip_without_amx(native)
    if not native.amx_bf16:
        pytest.skip("no AMX-BF16 in this build")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, weight, bias = randn(130, 1001), randn(600, 1001, seed=1), randn(600, seed=2)
        panels = native.pack_weight(weight, dtype=torch.bfloat16)  # a last panel of 24
        alone = torch.cat([native.matmul(x[i : i + 1], panels, bias, 600) for i in range(130)])
        for rows in (2, 5, 15, 16, 17, 31, 32, 33, 47, 48, 49, 64, 97, 130):
            assert torch.equal(native.matmul(x[:rows], panels, bias, 600), alone[:rows]), rows
            assert torch.equal(native.matmul(x[-rows:], panels, bias, 600), alone[-rows:]), rows
        rounded_x, rounded_w = x.bfloat16().double(), weight.bfloat16().double()
        expected = rounded_x @ rounded_w.T + bias.double()
        bound = 1002 * 2.0**-24 * (rounded_x.abs() @ rounded_w.abs().T + bias.abs().double())
        assert ((alone.double() - expected).abs() <= bound).all()
        native.use_amx(False)
        without = native.matmul(x, panels, bias, 600)
        assert not torch.equal(without, alone)  # TDPBF16PS's bits are not VDPBF16PS's
        assert torch.equal(without[:7], native.matmul(x[:7], panels, bias, 600))
        assert ((without.double() - expected).abs() <= bound).all()
    finally:
        native.use_amx(True)
        torch.set_num_threads(previous)


def test_amx_bf16_bits_are_the_same_with_either_compiler(kernels, native):
    """TDPBF16PS's operations are the instruction's: any native build on AMX gives them."""
    if not (native.amx_bf16 and kernels.amx_bf16):
        pytest.skip("no AMX-BF16 in these builds")
    skip_without_amx(native)
    x, weight = randn(37, 1001), randn(300, 1001, seed=1)
    assert torch.equal(bf16_matmul(kernels, x, weight), bf16_matmul(native, x, weight))


def test_amx_tiles_are_built_only_for_a_cpu_that_has_them(kernels):
    """Only a -march=native build on a CPU with AMX-INT8 has AMX tiles; the portable
    levels never do, so they run on any CPU of their level."""
    has_amx = "amx_int8" in native_build._cpu_flags() and "amx_tile" in native_build._cpu_flags()
    if kernels.build.level == native_build.NATIVE and has_amx:
        assert kernels.amx_status in ("in use", "refused")
    else:
        assert kernels.amx_status == "not built"
        kernels.use_amx(True)  # nothing to turn on
        assert kernels.amx_status == "not built"


def test_amx_tiles_that_disagree_at_start_up_are_turned_off(native, monkeypatch):
    from app.native.self_check import check_amx_tiles

    skip_without_amx(native)
    assert check_amx_tiles(native) == "" and native.amx_status == "in use"
    shifted = NativeKernels(native.build)  # the same library: the same AMX switch
    real_matmul = shifted.matmul

    def matmul_differing_with_amx(*args):
        out = real_matmul(*args)
        return out + 1.0 if shifted.amx_status == "in use" else out

    monkeypatch.setattr(shifted, "matmul", matmul_differing_with_amx)
    try:
        assert check_amx_tiles(shifted) == (
            "their int8 bits differed from the VNNI tiles' at start-up"
        )
        assert native.amx_status == "turned off"
    finally:
        native.use_amx(True)


@pytest.mark.parametrize("dtype", [torch.int8, INT4], ids=["int8", "int4"])
def test_quantized_panels_need_whole_blocks_of_inputs(native, dtype):
    with pytest.raises(ValueError, match="divisible by 32"):
        native.pack_weight(randn(64, 48), dtype=dtype)


# --- sliding-window attention (Mistral, Phi-3) ---------------------------------------------


def dense_windowed(query, keys, values, first_pos, scale, window):
    """dense_causal in fp64 where the token at position p sees keys p - window + 1 .. p."""
    tokens, heads, _ = query.shape
    group = heads // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)  # [L, heads, D]
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", query.double(), k) * scale
    positions = torch.arange(first_pos, first_pos + tokens)[:, None]
    key_pos = torch.arange(k.shape[0])[None, :]
    hidden = (key_pos > positions) | (key_pos <= positions - window)
    out = torch.einsum("hts,shd->thd", scores.masked_fill(hidden, float("-inf")).softmax(-1), v)
    return out.reshape(tokens, -1)


@pytest.mark.parametrize(("head_dim", "window"), [(64, 37), (64, 16), (24, 37), (128, 5)])
def test_windowed_attention_matches_dense_windowed_attention(kernels, head_dim, window):
    """A prefill chunk (tiles of 4 tokens) and decode tokens past the window, over
    scattered blocks; the window is not a block multiple but for 16: whole blocks before
    the first visible key are skipped, the rest masked."""
    length, first = 150, 120
    keys, values, key_cache, value_cache, table, query = chunk_after_prefix(length, first, head_dim)
    scale = head_dim**-0.5
    expected = dense_windowed(query, keys, values, first, scale, window)
    chunk = kernels.paged_attention(
        query, key_cache, value_cache, int32([table]), int32([0] * (length - first)),
        int32(range(first + 1, length + 1)), scale, window,
    )  # fmt: skip
    torch.testing.assert_close(chunk.double(), expected, atol=2e-6, rtol=1e-5)
    for row in range(0, length - first, 7):  # decode tokens, alone: the same bits
        alone = kernels.paged_attention(
            query[row : row + 1], key_cache, value_cache, int32([table]), int32([0]),
            int32([first + row + 1]), scale, window,
        )  # fmt: skip
        assert torch.equal(alone[0], chunk[row]), row


def test_a_window_wider_than_the_context_changes_no_bits(kernels):
    """window >= keys: the same call as without a window, bit for bit."""
    head_dim, length = 64, 70
    table = list(range(5))
    keys, values = randn(length, KV_HEADS, head_dim, seed=4), randn(length, KV_HEADS, head_dim)
    key_cache, value_cache = cache_with(keys, values, table, head_dim)
    query = randn(length, HEADS, head_dim, seed=6)
    args = (int32([table]), int32([0] * length), int32(range(1, length + 1)), 0.125)
    plain = kernels.paged_attention(query, key_cache, value_cache, *args)
    assert torch.equal(kernels.paged_attention(query, key_cache, value_cache, *args, 70), plain)
    assert not torch.equal(kernels.paged_attention(query, key_cache, value_cache, *args, 69), plain)
