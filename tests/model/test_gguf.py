"""A .gguf file as LAMINA_MODEL: tiny random models of each architecture lamina reads from
GGUF, written with the `gguf` package (F32, llama.cpp's names and q/k permutation), load
back to the very same weights and logits as their Hugging Face folder, with the same
tokenizer and chat template. The default model's own file (and its tokenizer):
test_model_sources.py."""

from __future__ import annotations

import json

import pytest
import torch

from app.model import gguf_folder
from app.model.kv_cache import KVCache
from app.model.loader import load_model
from app.weights_source import resolve_model_folder
from tests.model.gguf_writer import write_gguf
from tests.model.helpers import Chunk, NaiveBlockAllocator, model_logits, save_random_model

# architecture -> (transformers config class, the family's peculiarities switched on)
TINY_MODELS = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),  # q/k/v biases, tied head
    "qwen3": ("Qwen3Config", dict(head_dim=32)),  # per-head q/k norms, its own head_dim
}
NUM_TOKENS = 1024  # the tiny models' vocabulary: the default tokenizer's first tokens
PROMPT = [1, 504, 345, 314, 649, 30, 216, 2, 17, 901, 12, 12, 1023]


@pytest.fixture(scope="module", autouse=True)
def gguf_cache(tmp_path_factory):
    """GGUF folders of these tests go to a temporary cache of their own."""
    cache = tmp_path_factory.mktemp("gguf-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf_folder, "gguf_cache_dir", lambda: cache)
        yield cache


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, default_model_path):
    """architecture -> (Hugging Face folder, the same model as a .gguf file), with a small
    vocabulary: what these tests compare is the weights."""
    models = {}
    for arch, (config_class, fields) in TINY_MODELS.items():
        folder = save_random_model(
            tmp_path_factory.mktemp(f"tiny-{arch}"),
            config_class,
            seed=3,
            vocab_size=NUM_TOKENS,
            num_hidden_layers=2,
            max_position_embeddings=512,
            **fields,
        )
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            (folder / name).write_bytes((default_model_path / name).read_bytes())
        out = folder.parent / f"tiny-{arch}.gguf"
        models[arch] = (folder, write_gguf(folder, out, arch, num_tokens=NUM_TOKENS))
    return models


def _logits(model, prompt: list[int]) -> torch.Tensor:
    """lamina's logits for every position of `prompt` ([len, vocab]), one prefill."""
    cache = KVCache(model.config, 8, 16, torch.device("cpu"), torch.float32)
    table: list[int] = []
    NaiveBlockAllocator(8, 16).reserve(table, len(prompt))
    (logits,) = model_logits(model, cache, [Chunk(prompt, 0, table)])
    return logits


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_a_tiny_gguf_loads_the_folders_weights_and_logits(tiny_models, arch):
    folder, gguf_path = tiny_models[arch]
    served = resolve_model_folder(gguf_path)
    from_gguf = load_model(served, kernels="reference")
    from_folder = load_model(folder, kernels="reference")
    gguf_state, folder_state = from_gguf.state_dict(), from_folder.state_dict()
    assert gguf_state.keys() == folder_state.keys()
    for name, tensor in folder_state.items():
        assert torch.equal(gguf_state[name], tensor), name
    assert torch.equal(_logits(from_gguf, PROMPT), _logits(from_folder, PROMPT))
    assert (
        json.loads((served / "config.json").read_text())["architectures"]
        == json.loads((folder / "config.json").read_text())["architectures"]
    )


def test_the_gguf_folder_is_built_once(tiny_models, gguf_cache):
    _, gguf_path = tiny_models["llama"]
    first = resolve_model_folder(gguf_path)
    stamp = (first / "config.json").stat().st_mtime_ns
    assert resolve_model_folder(gguf_path) == first
    assert (first / "config.json").stat().st_mtime_ns == stamp
    assert not [p.name for p in gguf_cache.iterdir() if p.name.startswith(".")]  # no staging
