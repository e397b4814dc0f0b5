"""The loader packs each decoder layer as soon as it is loaded (app/model/layer_stream.py):
at most about one layer's linear weights at the model dtype are alive at once, whatever
the number of layers, and the checkpoint is read, never mapped (a map holds every page
read until the load ends), so a model loads in about the memory it is served in; a
checkpoint that does not fit the config is still refused by name."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from app.model.config import ModelLoadError
from app.model.linear import Linear
from app.model.loader import load_model
from app.model.safetensors_reader import read_safetensors
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


@dataclass
class WhilePacking:
    """What each Linear saw as it started packing."""

    projection_bytes: list[int] = field(default_factory=list)  # live_projection_bytes()
    maps: list[str] = field(default_factory=list)  # /proc/self/maps ("" without /proc)


@pytest.fixture
def while_packing(monkeypatch) -> WhilePacking:
    seen = WhilePacking()
    prepare = Linear.prepare_for_inference
    maps = Path("/proc/self/maps")

    def sampled(self, *args, **kwargs):
        seen.projection_bytes.append(live_projection_bytes())
        seen.maps.append(maps.read_text() if maps.is_file() else "")
        return prepare(self, *args, **kwargs)

    monkeypatch.setattr(Linear, "prepare_for_inference", sampled)
    return seen


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_one_layer_of_fp32_linear_weights_at_a_time(tmp_path, while_packing, tied):
    """bf16 storage from an fp32 checkpoint of 6 layers: while any Linear packs, the fp32
    projection weights alive are at most one layer's (the whole model's before), and the
    checkpoint file is not mapped."""
    save_random_llama(tmp_path, num_hidden_layers=NUM_LAYERS, tie_word_embeddings=tied)
    load_model(tmp_path, weight_dtype=torch.bfloat16)
    assert len(while_packing.projection_bytes) == 4 * NUM_LAYERS + 1  # and the head
    assert max(while_packing.projection_bytes) <= ONE_LAYER_BYTES
    assert live_projection_bytes() == 0  # nothing kept beyond the packed copies
    checkpoint = str(tmp_path / "model.safetensors")
    assert not any(checkpoint in maps for maps in while_packing.maps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_the_reader_gives_safetensors_own_tensors(tmp_path, dtype):
    tensors = {
        "b.matrix": torch.arange(35).reshape(5, 7).to(dtype),
        "a.scalar": torch.tensor(3).to(dtype),
        "c.empty": torch.zeros(0, 4, dtype=dtype),
    }
    save_file(tensors, tmp_path / "t.safetensors")
    got = list(read_safetensors(tmp_path / "t.safetensors"))
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as reader:
        assert [name for name, _ in got] == list(reader.keys())  # the same order
    for name, tensor in got:
        assert tensor.dtype == dtype and torch.equal(tensor, tensors[name]), name


def test_a_cut_short_safetensors_file_is_named(tmp_path):
    save_file({"w": torch.ones(64, 64)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(ModelLoadError, match="'w' lies past the end of the file"):
        list(read_safetensors(tmp_path / "model.safetensors"))


def _with_header(header: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header


@pytest.mark.parametrize(
    "content",
    [
        # a Git LFS pointer saved in the weights' place: its first 8 bytes read as a
        # header of exabytes, which must not be allocated
        b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n",
        _with_header(b"[1, 2]"),  # a header that is not an object
        _with_header(b'{"w": [1]}'),  # an entry that is not an object
        _with_header(b'{"w": {"dtype": "F32"}}'),  # an entry without a shape or offsets
    ],
    ids=["lfs-pointer", "header-list", "entry-list", "entry-fields"],
)
def test_a_file_that_is_not_safetensors_is_named(tmp_path, content):
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(ModelLoadError, match="model.safetensors: not a safetensors file"):
        list(read_safetensors(tmp_path / "model.safetensors"))


def _drop_o_proj(state):
    del state["model.layers.1.self_attn.o_proj.weight"]


def _add_a_fourth_layer(state):
    state["model.layers.3.input_layernorm.weight"] = torch.ones(HIDDEN)


def _widen_down_proj(state):
    state["model.layers.2.mlp.down_proj.weight"] = torch.ones(HIDDEN, INTERMEDIATE + 1)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop_o_proj, r"missing: layers\.1\.attn\.o_proj\.weight$"),
        (_add_a_fourth_layer, r"unexpected: layers\.3\.input_norm\.weight$"),
        (_widen_down_proj, r"config.json in layers\.2: .*mlp\.down_proj\.weight"),
    ],
    ids=["missing tensor", "layer the config lacks", "wrong shape"],
)
def test_a_checkpoint_that_does_not_fit_is_named(tmp_path, edit, message):
    save_random_llama(tmp_path, num_hidden_layers=3)
    state = load_file(tmp_path / "model.safetensors")
    edit(state)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=message):
        load_model(tmp_path)
