"""LAMINA_WEIGHT_DTYPE=int4 on a GGUF file whose projections are Q4_0, Q4_1 or Q4_K: the
int4 panels are made from the file's own blocks, so every weight the kernels multiply by
is the file's, bit for bit (the `gguf` package's dequantize is the reference); a mix
like Q4_K_M keeps its wider (Q6_K) projections in int8 blocks."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from app.model.gguf_folder import file_weight_dtype
from app.model.gguf_int4 import decode_int4, int4_storage
from app.model.linear import Linear
from app.model.loader import load_model
from app.model.runner import matmul_storage
from app.native.panels import INT4, dequantize_int4, pack_int4
from app.weights_source import resolve_model_folder
from tests.model.gguf_writer import random_blocks, write_gguf
from tests.model.helpers import save_random_model
from tests.unit.test_fused_layers import fresh_cache, two_steps

NUM_TOKENS = 1024  # the tiny model's vocabulary: the default tokenizer's first tokens
EXACT_TYPES = ("Q4_0", "Q4_1", "Q4_K")


# GGUF folders of these tests go to a temporary cache of their own, built once per module.
pytestmark = pytest.mark.usefixtures("module_gguf_cache")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, default_model_path):
    """A 2-layer random LLaMA whose every projection takes whole Q4_K superblocks (256
    inputs), with the default tokenizer's first tokens."""
    folder = save_random_model(
        tmp_path_factory.mktemp("tiny-llama"), "LlamaConfig", seed=3, vocab_size=NUM_TOKENS,
        hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256,
    )  # fmt: skip
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / file).write_bytes((default_model_path / file).read_bytes())
    return folder


def file_bytes(quant: str, shape: tuple[int, int], seed: int) -> np.ndarray:
    """A tensor of type `quant` [rows, bytes per row]: quantized by the `gguf` package
    where it can, random blocks where it cannot (Q4_K)."""
    weight = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    weight[0, :32] = 0.25  # a constant block
    try:
        return gguf.quants.quantize(weight, gguf.GGMLQuantizationType[quant])
    except NotImplementedError:
        return random_blocks(quant, shape, seed)


@pytest.mark.parametrize("quant", EXACT_TYPES)
def test_the_files_blocks_are_its_values_bit_for_bit(quant):
    """Decoded into lamina's blocks and packed into panels, a tensor's weights are what
    gguf.quants.dequantize makes of its bytes; 70 rows: a panel and a part of one."""
    shape = (70, 512)
    raw = file_bytes(quant, shape, seed=1)
    reference = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[quant]))
    blocks = decode_int4(raw, quant, shape[1])
    assert blocks.q.dtype == torch.uint8 and int(blocks.q.max()) <= 15
    assert blocks.scales.shape == blocks.minima.shape == (70, 512 // 32)
    assert torch.equal(blocks.values(), reference)
    assert torch.equal(dequantize_int4(pack_int4(blocks), shape[0]), reference)


def test_an_int4_plan_keeps_wider_parts_in_int8():
    assert int4_storage(["Q4_K", "Q4_K", "Q4_0"], file_has_4_bits=True) == "file"
    assert int4_storage(["Q4_K", "Q4_K", "Q6_K"], file_has_4_bits=True) == "int8"
    assert int4_storage(["Q3_K", "Q4_K"], file_has_4_bits=True) == "int4"  # not on the grid
    assert int4_storage(["Q8_0"], file_has_4_bits=False) == "int4"  # int4 asked for all


def projections(model) -> dict[str, Linear]:
    return {n: m for n, m in model.layers.named_modules(prefix="layers") if isinstance(m, Linear)}


def serve_gguf(folder, path, **quants):
    served = resolve_model_folder(write_gguf(folder, path, num_tokens=NUM_TOKENS, **quants))
    file_values = projections(load_model(served, kernels="reference"))
    return file_values, load_model(served, max_positions=256, weight_dtype=INT4)


@pytest.mark.parametrize("quant", EXACT_TYPES)
def test_int4_serves_the_files_4_bit_weights_exactly(tiny_llama, tmp_path, quant, native):
    """A tiny LLaMA saved as GGUF with its projections in `quant`, loaded with int4
    weights: every projection's panels hold the file's weights (dequantized by the `gguf`
    package, q/k permutation undone), merged q/k/v and gate/up included; the head
    stays in int8 blocks."""
    file_values, model = serve_gguf(tiny_llama, tmp_path / f"{quant}.gguf", quant=quant)
    assert len(file_values) == 4 * 2  # qkv, o, gate_up, down in each of 2 layers
    for name, packed in projections(model).items():
        weight = file_values[name].weight  # [out, in]
        assert packed.kernel.panels.dtype == INT4, name
        assert torch.equal(dequantize_int4(packed.kernel.panels, weight.shape[0]), weight), name
        assert packed.file_int4 is None  # read once, at packing
    assert model.lm_head.kernel.panels.dtype == torch.int8
    assert matmul_storage(model) == "int4; head int8"  # what /status and the benches say
    assert model.fuse_layers


def test_int4_never_dequantizes_the_files_4_bit_projections(
    tiny_llama, tmp_path, monkeypatch, native
):
    """The kernels read a Q4_0 file's projections from its blocks, so the loader does not
    dequantize them at all (an 8B model's would be 28 GB of fp32): only the embedding,
    the head and the norms are."""
    served = resolve_model_folder(
        write_gguf(tiny_llama, tmp_path / "Q4_0.gguf", num_tokens=NUM_TOKENS, quant="Q4_0")
    )
    dequantize = gguf.quants.dequantize
    dequantized: list[int] = []

    def counted(data, qtype):
        values = dequantize(data, qtype)
        dequantized.append(values.size)
        return values

    monkeypatch.setattr(gguf.quants, "dequantize", counted)
    model = load_model(served, max_positions=256, weight_dtype=INT4)
    hidden, num_layers = 256, 2
    assert sum(dequantized) == 2 * NUM_TOKENS * hidden + (2 * num_layers + 1) * hidden
    assert all(linear.kernel.panels.dtype == INT4 for linear in projections(model).values())


def test_a_mix_keeps_its_wider_projections_in_int8_blocks(tiny_llama, tmp_path, native):
    """Q4_K_M's layout: Q4_K, with v and one layer's down projection in Q6_K. v's part
    puts the merged qkv in int8 blocks; layer 0's down too, layer 1's is the file's Q4_K;
    the fused stack runs the mixed kinds as the per-op path does. (Not to 1e-4: where the
    two paths' norms differ in a last bit, a row's int8 quantization can round one value
    the other way, which these random 4-bit weights, larger than a trained model's, carry
    to 0.8 % of the logits' largest; panels read as the wrong kind would be noise.)"""
    overrides = {"v_proj": "Q6_K", "layers.0.mlp.down_proj": "Q6_K"}
    file_values, model = serve_gguf(
        tiny_llama, tmp_path / "mix.gguf", quant="Q4_K", quant_overrides=overrides
    )
    assert file_weight_dtype(resolve_model_folder(tmp_path / "mix.gguf")) == "int4"  # auto
    kinds = {name: linear.kernel.panels.dtype for name, linear in projections(model).items()}
    assert kinds == {
        "layers.0.attn.qkv_proj": torch.int8,
        "layers.0.attn.o_proj": INT4,
        "layers.0.mlp.gate_up_proj": INT4,
        "layers.0.mlp.down_proj": torch.int8,
        "layers.1.attn.qkv_proj": torch.int8,
        "layers.1.attn.o_proj": INT4,
        "layers.1.mlp.gate_up_proj": INT4,
        "layers.1.mlp.down_proj": INT4,
    }
    assert matmul_storage(model) == "int4 x 5, int8 x 3; head int8"
    for name, linear in projections(model).items():
        if kinds[name] == INT4:
            weight = file_values[name].weight
            assert torch.equal(dequantize_int4(linear.kernel.panels, weight.shape[0]), weight)
    assert model.fuse_layers
    fused = two_steps(model, fresh_cache(model))
    model.fuse_layers = False
    for got, expected in zip(fused, two_steps(model, fresh_cache(model))):
        assert (got - expected).abs().max() <= 0.02 * expected.abs().max()
