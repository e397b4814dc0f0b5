"""The decoder layers as one native call (app/model/fused_layers.py, kernels.c's
lamina_decoder_stack) against the per-op path that runs the same kernels from torch."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from app.model import linear
from app.model.fused_layers import bound_layers
from app.model.kv_cache import KVCache
from app.model.linear import ALL_GENERATED, ALL_PROMPT, RowKinds
from app.model.loader import load_model
from app.native.panels import INT4
from app.native.stack import StackShape, describe_stack
from tests.model.helpers import Chunk, model_logits, save_random_llama

BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def odd_llama_path(tmp_path_factory):
    """Biases everywhere, head_dim 24 and an intermediate size of 88: every tail path of
    the C kernels (partial vectors, scalar attention sums)."""
    return save_random_llama(
        tmp_path_factory.mktemp("odd-llama"),
        seed=3,
        hidden_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=88,
        attention_bias=True,
        mlp_bias=True,
    )


def fresh_cache(model, num_blocks: int = 48) -> KVCache:
    return KVCache(model.config, num_blocks, BLOCK_SIZE, torch.device("cpu"), torch.float32)


def token_ids(count: int, seed: int, vocab: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (count,), generator=generator).tolist()


def two_steps(model, cache: KVCache) -> list[torch.Tensor]:
    """Step 1: a 21-token prompt (A) and a 6-token one (B). Step 2: A decodes one token,
    B's next 9 tokens run as a chunk, C (3 tokens) starts: decode and prefill mixed."""
    vocab = model.config.vocab_size
    a, b, c = token_ids(22, 1, vocab), token_ids(15, 2, vocab), token_ids(3, 3, vocab)
    tables = {"a": [40, 3, 17, 8, 22, 1], "b": [5, 30, 11, 2], "c": [9]}
    first = [Chunk(a[:21], 0, tables["a"]), Chunk(b[:6], 0, tables["b"])]
    second = [
        Chunk(a[21:], 21, tables["a"]),
        Chunk(b[6:], 6, tables["b"]),
        Chunk(c, 0, tables["c"]),
    ]
    return model_logits(model, cache, first) + model_logits(model, cache, second)


@pytest.fixture
def model_kernels(kernels, monkeypatch):
    """Models loaded in the test run on `kernels`: one instruction-set level and compiler."""
    monkeypatch.setattr(linear, "native_kernels", lambda: kernels)
    return kernels


def assert_fused_matches_per_op(model) -> None:
    assert model.fuse_layers, "every Linear is native here: the layers must run fused"
    fused_cache, per_op_cache = fresh_cache(model), fresh_cache(model)
    fused = two_steps(model, fused_cache)
    model.fuse_layers = False
    per_op = two_steps(model, per_op_cache)
    for got, expected in zip(fused, per_op):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # Both wrote the same keys and values (up to rounding) into the same slots.
    torch.testing.assert_close(fused_cache._storage, per_op_cache._storage, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("weight_dtype", [None, torch.bfloat16, torch.int8, INT4])
def test_fused_layers_match_the_per_op_path(native, tiny_model_path, weight_dtype):
    """fp32 weights, and bf16, int8 or 4-bit ones: one panel copy for every row, in both
    paths (int8 and 4-bit: each matmul's rows quantized per block of 32 on the way in)."""
    model = load_model(tiny_model_path, max_positions=256, weight_dtype=weight_dtype)
    assert_fused_matches_per_op(model)


@pytest.mark.parametrize("weight_dtype", [None, torch.bfloat16, torch.int8, INT4])
def test_fused_layers_match_the_per_op_path_on_every_build(
    model_kernels, odd_llama_path, weight_dtype
):
    model = load_model(odd_llama_path, max_positions=256, weight_dtype=weight_dtype)
    assert model.native is model_kernels
    assert_fused_matches_per_op(model)


@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.bfloat16, torch.int8, INT4])
def test_fused_rows_of_mixed_kinds_equal_rows_computed_one_by_one(
    native, tiny_model_path, weight_dtype
):
    """fp16 weights: prompt rows take the fp32 panels and generated ones the fp16 panels,
    in one call with the rows put in kind order and back; each row's bits are those of
    a step that computes that token alone, with its kind. 60 rows: the matmuls split
    them in blocks of 48, across the boundary between the kinds. bf16, int8 and 4-bit
    weights: one copy for both kinds, so the same bits whatever the split."""
    model = load_model(tiny_model_path, max_positions=256, weight_dtype=weight_dtype)
    assert model.fuse_layers
    ids = token_ids(60, 4, model.config.vocab_size)
    table = torch.randperm(48, generator=torch.Generator().manual_seed(1))[: 60 // BLOCK_SIZE]
    table = table.tolist()
    # Interleaved kinds, as a preempted sequence's recompute can have them.
    is_prompt = [True, True, False, True, False, False, True, False, True, True] * 6
    kinds = RowKinds.from_flags(is_prompt, "cpu")
    mixed = model_logits(model, fresh_cache(model), [Chunk(ids, 0, table)], kinds)[0]
    cache = fresh_cache(model)
    for i, flag in enumerate(is_prompt):
        kind = ALL_PROMPT if flag else ALL_GENERATED
        alone = model_logits(model, cache, [Chunk(ids[i : i + 1], i, table)], kind)[0]
        assert torch.equal(mixed[i], alone[0]), f"row {i}"
    model.fuse_layers = False
    per_op = model_logits(model, fresh_cache(model), [Chunk(ids, 0, table)], kinds)[0]
    torch.testing.assert_close(mixed, per_op, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("weight_dtype", [None, torch.bfloat16, torch.int8, INT4])
def test_fused_bits_do_not_depend_on_the_thread_count(model_kernels, tiny_model_path, weight_dtype):
    model = load_model(tiny_model_path, max_positions=256, weight_dtype=weight_dtype)
    assert model.native is model_kernels
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = two_steps(model, fresh_cache(model))
        torch.set_num_threads(2)
        shared = two_steps(model, fresh_cache(model))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(alone, shared))


def test_torch_kernels_keep_the_per_op_path(tiny_model_path):
    model = load_model(tiny_model_path, max_positions=256, kernels="torch")
    assert not model.fuse_layers


def layer_weights(model, cache: KVCache):
    from app.model.fused_layers import _layer_weights

    return [
        _layer_weights(layer, cache.layer(i), None, False) for i, layer in enumerate(model.layers)
    ]


def test_a_stack_with_mismatched_tensors_is_refused(native, tiny_model_path):
    model = load_model(tiny_model_path, max_positions=256)
    layers = layer_weights(model, fresh_cache(model))
    config = model.config
    good = StackShape(
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.intermediate_size,
        1e-5,
        config.head_dim**-0.5,
    )
    assert describe_stack(layers, good).num_layers == 2
    with pytest.raises(ValueError, match="fp32"):
        bad = dataclasses.replace(layers[0], input_norm=layers[0].input_norm.double())
        describe_stack([bad, layers[1]], good)
    with pytest.raises(ValueError, match="gate_up"):
        describe_stack(layers, dataclasses.replace(good, intermediate=config.intermediate_size + 1))
    with pytest.raises(ValueError, match="heads"):
        describe_stack(layers, dataclasses.replace(good, num_kv_heads=config.num_kv_heads + 1))
    with pytest.raises(ValueError, match="at least one layer"):
        describe_stack([], good)


def test_a_step_with_a_slot_outside_the_cache_is_refused(native, tiny_model_path):
    model = load_model(tiny_model_path, max_positions=256)
    cache = fresh_cache(model, num_blocks=4)
    stack = bound_layers(model, cache).stack
    config = model.config
    x = torch.zeros(1, config.hidden_size)
    rotary = torch.zeros(1, config.head_dim)
    tables, one = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    outside = torch.tensor([cache.num_allocated_blocks * BLOCK_SIZE])
    with pytest.raises(ValueError, match="outside the KV cache"):
        native.decoder_stack(stack, x, 1, rotary, rotary, outside, tables, one * 0, one)
    with pytest.raises(ValueError, match="x must be fp32"):
        native.decoder_stack(
            stack, x.double(), 1, rotary, rotary, outside * 0, tables, one * 0, one
        )
    with pytest.raises(ValueError, match="split"):
        native.decoder_stack(stack, x, 2, rotary, rotary, outside * 0, tables, one * 0, one)
