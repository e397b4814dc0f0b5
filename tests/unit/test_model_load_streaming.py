"""The loader packs each decoder layer as soon as it is loaded (app/model/layer_stream.py):
at most about one layer's linear weights at the model dtype are alive at once, whatever
the number of layers, so a model loads in about the memory it is served in; a checkpoint
that does not fit the config is still refused by name."""

from __future__ import annotations

import gc

import pytest
import torch
from safetensors.torch import load_file, save_file

from app.model.config import ModelLoadError
from app.model.linear import Linear
from app.model.loader import load_model
from tests.model.helpers import save_random_llama

NUM_LAYERS = 6
# hidden 64, 4 heads of 16, 2 kv heads, intermediate 96 (save_random_llama's defaults)
HIDDEN, Q_SIZE, KV_SIZE, INTERMEDIATE = 64, 64, 32, 96
PROJECTION_SHAPES = {
    (Q_SIZE, HIDDEN), (KV_SIZE, HIDDEN), (Q_SIZE + 2 * KV_SIZE, HIDDEN),  # q, k/v, qkv
    (HIDDEN, Q_SIZE),  # o
    (INTERMEDIATE, HIDDEN), (2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE),  # mlp
}  # fmt: skip
FP32 = 4
ONE_LAYER_BYTES = FP32 * HIDDEN * (Q_SIZE + 2 * KV_SIZE + Q_SIZE + 3 * INTERMEDIATE)


def live_projection_bytes() -> int:
    """Bytes of every fp32 tensor alive now with a projection's shape (or a part's), each
    piece of memory counted once: the loaded, not yet packed, linear weights."""
    seen = set()
    for obj in gc.get_objects():
        if (
            issubclass(type(obj), torch.Tensor)  # not isinstance: no __class__ lookups
            and obj.dtype == torch.float32
            and not obj.is_meta
            and tuple(obj.shape) in PROJECTION_SHAPES
        ):
            seen.add((obj.data_ptr(), obj.numel() * obj.element_size()))
    return sum(nbytes for _, nbytes in seen)


@pytest.fixture
def peak_while_packing(monkeypatch):
    """The largest live_projection_bytes() seen as each Linear starts packing."""
    samples: list[int] = []
    prepare = Linear.prepare_for_inference

    def sampled(self, *args, **kwargs):
        samples.append(live_projection_bytes())
        return prepare(self, *args, **kwargs)

    monkeypatch.setattr(Linear, "prepare_for_inference", sampled)
    return samples


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_one_layer_of_fp32_linear_weights_at_a_time(tmp_path, peak_while_packing, tied):
    """bf16 storage from an fp32 checkpoint of 6 layers: while any Linear packs, the fp32
    projection weights alive are at most one layer's (the whole model's before)."""
    save_random_llama(tmp_path, num_hidden_layers=NUM_LAYERS, tie_word_embeddings=tied)
    load_model(tmp_path, weight_dtype=torch.bfloat16)
    assert len(peak_while_packing) == 4 * NUM_LAYERS + 1  # every Linear, and the head
    assert max(peak_while_packing) <= ONE_LAYER_BYTES
    assert live_projection_bytes() == 0  # nothing kept beyond the packed copies


def test_a_missing_tensor_is_named(tmp_path):
    save_random_llama(tmp_path, num_hidden_layers=3)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.self_attn.o_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"missing: layers\.1\.attn\.o_proj\.weight$"):
        load_model(tmp_path)


def test_a_layer_the_config_lacks_is_named(tmp_path):
    save_random_llama(tmp_path, num_hidden_layers=3)
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.3.input_layernorm.weight"] = torch.ones(HIDDEN)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"unexpected: layers\.3\.input_norm\.weight$"):
        load_model(tmp_path)


def test_a_wrong_shape_is_named(tmp_path):
    save_random_llama(tmp_path, num_hidden_layers=3)
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.2.mlp.down_proj.weight"] = torch.ones(HIDDEN, INTERMEDIATE + 1)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"config.json in layers\.2: .*mlp\.down_proj\.weight"):
        load_model(tmp_path)
