"""A .gguf file as LAMINA_MODEL: tiny random models of each architecture lamina reads from
GGUF, written with the `gguf` package (F32, llama.cpp's names and q/k permutation), load
back to the very same weights and logits as their Hugging Face folder, with the same
tokenizer and chat template. The default model's own file (and its tokenizer):
test_model_sources.py."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from app.model.config import ModelLoadError
from app.model.gguf import _llama3_rope_scaling, llama3_rope_divisors
from app.model.kv_cache import KVCache
from app.model.linear import Linear
from app.model.loader import load_model
from app.native.panels import INT4, dequantize_int4, dequantize_int8
from app.weights_source import ModelSourceError, resolve_model_folder
from tests.model.gguf_writer import write_gguf
from tests.model.helpers import Chunk, NaiveBlockAllocator, model_logits, save_random_model

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# name -> (GGUF architecture, transformers config class, the peculiarities switched on)
TINY_MODELS = {
    "llama": ("llama", "LlamaConfig", dict(tie_word_embeddings=False)),
    # Llama 3.1's rope scaling, which llama.cpp stores as a rope_freqs tensor.
    "llama3_rope": (
        "llama",
        "LlamaConfig",
        dict(rope_scaling=LLAMA3_ROPE, max_position_embeddings=16384),
    ),
    "qwen2": ("qwen2", "Qwen2Config", dict(tie_word_embeddings=True)),  # q/k/v biases, tied
    "qwen3": ("qwen3", "Qwen3Config", dict(head_dim=32)),  # q/k norms, its own head_dim
}
NUM_TOKENS = 1024  # the tiny models' vocabulary: the default tokenizer's first tokens
PROMPT = [1, 504, 345, 314, 649, 30, 216, 2, 17, 901, 12, 12, 1023]


# GGUF folders of these tests go to a temporary cache of their own, built once per module.
pytestmark = pytest.mark.usefixtures("module_gguf_cache")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, default_model_path):
    """name -> (Hugging Face folder, the same model as a .gguf file), with a small
    vocabulary: what these tests compare is the weights."""
    models = {}
    for name, (arch, config_class, fields) in TINY_MODELS.items():
        folder = save_random_model(
            tmp_path_factory.mktemp(f"tiny-{name}"),
            config_class,
            seed=3,
            vocab_size=NUM_TOKENS,
            num_hidden_layers=2,
            **{"max_position_embeddings": 512, **fields},
        )
        for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            (folder / file).write_bytes((default_model_path / file).read_bytes())
        out = folder.parent / f"tiny-{name}.gguf"
        models[name] = (folder, write_gguf(folder, out, arch, num_tokens=NUM_TOKENS))
    return models


def _logits(model, prompt: list[int]) -> torch.Tensor:
    """lamina's logits for every position of `prompt` ([len, vocab]), one prefill."""
    cache = KVCache(model.config, 8, 16, torch.device("cpu"), torch.float32)
    table: list[int] = []
    NaiveBlockAllocator(8, 16).reserve(table, len(prompt))
    (logits,) = model_logits(model, cache, [Chunk(prompt, 0, table)])
    return logits


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_a_tiny_gguf_loads_the_folders_weights_and_logits(tiny_models, name):
    folder, gguf_path = tiny_models[name]
    served = resolve_model_folder(gguf_path)
    from_gguf = load_model(served, kernels="reference")
    from_folder = load_model(folder, kernels="reference")
    gguf_state, folder_state = from_gguf.state_dict(), from_folder.state_dict()
    assert gguf_state.keys() == folder_state.keys()
    for key, tensor in folder_state.items():
        assert torch.equal(gguf_state[key], tensor), key
    assert torch.equal(_logits(from_gguf, PROMPT), _logits(from_folder, PROMPT))
    # GGUF stores the norm's epsilon as a float32, which is what the norm adds anyway.
    assert np.float32(from_gguf.config.rms_norm_eps) == np.float32(from_folder.config.rms_norm_eps)
    eps = from_folder.config.rms_norm_eps
    assert replace(from_gguf.config, rms_norm_eps=eps) == from_folder.config  # rope too
    if name == "llama3_rope":
        assert from_gguf.config.rope_scaling.rope_type == "llama3"


def test_rope_freqs_other_than_llama3s_are_refused(tmp_path):
    divisors = llama3_rope_divisors(500000.0, 64, 8.0, 1.0, 4.0, 8192)
    assert _llama3_rope_scaling(divisors, 500000.0, 64, tmp_path)["factor"] == 8.0
    assert _llama3_rope_scaling(np.ones(32), 500000.0, 64, tmp_path) is None
    divisors[20] *= 1.01
    with pytest.raises(ModelLoadError, match="'rope_freqs.weight' is not Llama 3's"):
        _llama3_rope_scaling(divisors, 500000.0, 64, tmp_path)


def test_the_gguf_folder_is_built_once(tiny_models, module_gguf_cache):
    _, gguf_path = tiny_models["llama"]
    first = resolve_model_folder(gguf_path)
    stamp = (first / "config.json").stat().st_mtime_ns
    assert resolve_model_folder(gguf_path) == first
    assert (first / "config.json").stat().st_mtime_ns == stamp
    assert not [p.name for p in module_gguf_cache.iterdir() if p.name.startswith(".")]  # no staging


def test_a_file_cut_short_is_refused_as_such(tiny_models, tmp_path):
    _, gguf_path = tiny_models["llama"]
    short = tmp_path / "short.gguf"
    short.write_bytes(gguf_path.read_bytes()[:-100])  # an interrupted download
    with pytest.raises(ModelSourceError, match="ends before its tensors' data does"):
        resolve_model_folder(short)


# GGUF quant type -> lamina's weight dtype with the same blocks, and its dequantizer
# (Q4_1 as llama.cpp quantizes it without an importance matrix, as the gguf package does).
SAME_BLOCKS = {
    "Q8_0": (torch.int8, dequantize_int8),  # 32 weights, scale = largest / 127
    "Q4_1": (INT4, dequantize_int4),  # 32 weights, scale = range / 15, and the minimum
}
GGUF_ARCH_OF = {name: arch for name, (arch, _, _) in TINY_MODELS.items()}


@pytest.mark.parametrize("quant", sorted(SAME_BLOCKS))
def test_quantized_projections_keep_their_values_in_the_same_blocks(
    tiny_models, tmp_path, quant, native
):
    """A Q8_0 (Q4_1) file served with LAMINA_WEIGHT_DTYPE=int8 (int4): lamina dequantizes
    each projection at load and quantizes it again into blocks of its own, which are the
    file's: every weight the kernel multiplies by is the file's dequantized value."""
    folder, _ = tiny_models["llama"]
    served = resolve_model_folder(
        write_gguf(folder, tmp_path / "q.gguf", num_tokens=NUM_TOKENS, quant=quant)
    )
    weight_dtype, dequantize = SAME_BLOCKS[quant]
    file_values = load_model(served, kernels="reference")
    quantized = load_model(served, weight_dtype=weight_dtype)
    original = load_model(folder, kernels="reference").layers[0].mlp.down_proj.weight
    assert not torch.equal(file_values.layers[0].mlp.down_proj.weight, original)  # quantized
    pairs = [
        (name, module, dict(quantized.named_modules())[name])
        for name, module in file_values.layers.named_modules(prefix="layers")
        if isinstance(module, Linear)
    ]
    assert len(pairs) == 4 * 2  # qkv, o, gate_up, down in each of 2 layers
    for name, reference, packed in pairs:
        assert packed.kernel.panels.dtype == weight_dtype, name
        weight = reference.weight  # [out, in]: the file's values, dequantized by gguf
        assert torch.equal(dequantize(packed.kernel.panels, weight.shape[0]), weight), name


def test_auto_weight_storage_follows_the_files_quant_type(tiny_models, tmp_path, caplog):
    """LAMINA_WEIGHT_DTYPE=auto keeps a quantized file's precision on the native CPU
    kernels: int8 for Q8_0 (its own blocks), int4 for Q4_0 and Q4_1 (their own blocks:
    test_gguf_int4.py), F16 kept; the model dtype for F32 files, and wherever the native
    kernels do not run."""
    from app.config import Settings
    from app.model.runner import weight_storage

    caplog.set_level("INFO", logger="app.model.runner")
    cpu, fp32 = torch.device("cpu"), torch.float32
    expected = {
        ("llama", "Q8_0"): "int8",
        ("llama", "Q4_1"): "int4",
        ("llama", "Q4_0"): "int4",
        ("llama", "F16"): "float16",
        ("qwen2", "Q8_0"): "int8",  # its q/k/v biases stay F32 in the file
        ("qwen2", "F16"): "float16",
        ("llama", None): "auto",
    }
    for (name, quant), storage in expected.items():
        folder, path = tiny_models[name]
        if quant is not None:
            out = tmp_path / f"{name}-{quant}.gguf"
            path = write_gguf(folder, out, GGUF_ARCH_OF[name], num_tokens=NUM_TOKENS, quant=quant)
        settings = Settings(model=resolve_model_folder(path))
        assert weight_storage(settings, cpu, fp32) == storage, (name, quant)
        chosen = settings.model_copy(update={"weight_dtype": "float32"})
        assert weight_storage(chosen, cpu, fp32) == "float32"
        if quant is not None:  # where the native kernels do not run: the model dtype
            assert weight_storage(settings, cpu, torch.bfloat16) == "auto"
            assert weight_storage(settings, torch.device("cuda"), fp32) == "auto"
            torch_kernels = settings.model_copy(update={"native_kernels": False})
            assert weight_storage(torch_kernels, cpu, fp32) == "auto"
    assert weight_storage(Settings(model=tiny_models["llama"][0]), cpu, fp32) == "auto"
    assert "weights: int8, as the GGUF file stores them" in caplog.text
