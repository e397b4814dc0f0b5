"""A GGUF file's Q8_0 embedding (the default Q4_1 file's is) served from its own blocks
(app/model/embedding.py): every row, and the logits, bit for bit what the dequantized
fp32 matrix of before gave, in a quarter of its memory."""

from __future__ import annotations

import pytest
import torch

from app.model import gguf, linear, loader
from app.model.embedding import PanelEmbedding, Q8_0Embedding
from app.model.kv_cache import KVCache
from app.model.loader import load_model
from app.native.panels import INT4
from app.weights_source import resolve_model_folder
from tests.model.gguf_writer import write_gguf
from tests.model.helpers import Chunk, NaiveBlockAllocator, model_logits, save_random_model

NUM_TOKENS = 1024
PROMPT = [1, 504, 345, 314, 649, 30, 216, 2, 17, 901, 12, 12, 1023]
WEIGHT_DTYPES = {"float32": None, "int8": torch.int8, "int4": INT4}

pytestmark = pytest.mark.usefixtures("module_gguf_cache")


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def q8_0_embedding_gguf(request, tmp_path_factory, default_model_path):
    """A tiny random LLaMA as a GGUF folder: Q4_1 projections, a Q8_0 token_embd."""
    folder = save_random_model(
        tmp_path_factory.mktemp("tiny"), "LlamaConfig", seed=5, vocab_size=NUM_TOKENS,
        tie_word_embeddings=request.param,
    )  # fmt: skip
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / file).write_bytes((default_model_path / file).read_bytes())
    out = folder.parent / "tiny.gguf"
    write_gguf(folder, out, num_tokens=NUM_TOKENS, quant="Q4_1", embedding_quant="Q8_0")
    return resolve_model_folder(out)


def _dequantized_load(monkeypatch, folder, weight_dtype):
    """The model as loaded before: the Q8_0 embedding dequantized to an fp32 matrix."""
    with monkeypatch.context() as patch:
        patch.setattr(loader, "use_files_q8_0_embedding", lambda *args: frozenset())
        return load_model(folder, weight_dtype=weight_dtype)


def _logits(model, prompt: list[int]) -> torch.Tensor:
    cache = KVCache(model.config, 4, 16, torch.device("cpu"), torch.float32)
    table: list[int] = []
    NaiveBlockAllocator(4, 16).reserve(table, len(prompt))
    (logits,) = model_logits(model, cache, [Chunk(prompt, 0, table)])
    return logits  # [len(prompt), vocab]


def _check_same_as_dequantized(monkeypatch, folder, weight_dtype, prompt):
    new = load_model(folder, weight_dtype=weight_dtype)
    old = _dequantized_load(monkeypatch, folder, weight_dtype)
    ids = torch.arange(new.config.vocab_size)
    assert torch.equal(new.embed(ids), old.embed(ids))  # every row, bit for bit
    assert torch.equal(_logits(new, prompt), _logits(old, prompt))
    return new


@pytest.mark.parametrize("weight", sorted(WEIGHT_DTYPES))
def test_a_q8_0_embedding_gives_the_dequantized_rows_and_logits(
    native, monkeypatch, q8_0_embedding_gguf, weight
):
    model = _check_same_as_dequantized(
        monkeypatch, q8_0_embedding_gguf, WEIGHT_DTYPES[weight], PROMPT
    )
    if model.config.tie_word_embeddings and weight == "float32":
        assert isinstance(model.embed_tokens, PanelEmbedding)  # the head's fp32 panels
        return
    assert isinstance(model.embed_tokens, Q8_0Embedding)
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    stored = sum(p.numel() * p.element_size() for p in model.embed_tokens.parameters())
    assert stored == vocab * hidden + vocab * hidden // 32 * 2  # int8 + an fp16 scale per 32


def test_reference_kernels_read_the_q8_0_embedding_too(q8_0_embedding_gguf, monkeypatch):
    model = load_model(q8_0_embedding_gguf, kernels="reference")
    ids = torch.arange(model.config.vocab_size)
    with monkeypatch.context() as patch:
        patch.setattr(loader, "use_files_q8_0_embedding", lambda *args: frozenset())
        old = load_model(q8_0_embedding_gguf, kernels="reference")
    assert torch.equal(model.embed(ids), old.embed(ids))
    assert torch.equal(model.lm_head.weight, old.lm_head.weight)


@pytest.mark.parametrize("weight", ["int8", "int4"])
def test_the_default_gguf_serves_the_same_logits(native, monkeypatch, default_gguf_path, weight):
    folder = resolve_model_folder(default_gguf_path)
    model = _check_same_as_dequantized(monkeypatch, folder, WEIGHT_DTYPES[weight], PROMPT[:6])
    assert isinstance(model.embed_tokens, Q8_0Embedding)  # 29 MiB, not 108


def test_a_bf16_model_reads_a_tied_q8_0_embedding_from_the_heads_bf16_weight(
    q8_0_embedding_gguf, monkeypatch
):
    """The path CUDA takes (torch's kernel on the weight at the model dtype), on the CPU:
    the head's bf16 matrix serves the rows the Q8_0 blocks would, rounded to bf16 once."""
    monkeypatch.setattr(linear, "onednn_available", lambda dtype: False)
    model = load_model(q8_0_embedding_gguf, dtype=torch.bfloat16, kernels="torch")
    old = _dequantized_load_at(monkeypatch, q8_0_embedding_gguf, torch.bfloat16)
    ids = torch.arange(model.config.vocab_size)
    assert torch.equal(model.embed(ids), old.embed(ids))
    assert model.embed(ids).dtype == torch.bfloat16
    if model.config.tie_word_embeddings:  # one bf16 matrix, the head's
        assert isinstance(model.lm_head.kernel, linear.TorchLinearKernel)
        assert model.embed_tokens.weight.data_ptr() == model.lm_head.kernel.weight.data_ptr()
    else:
        assert isinstance(model.embed_tokens, Q8_0Embedding)


def _dequantized_load_at(monkeypatch, folder, dtype):
    with monkeypatch.context() as patch:
        patch.setattr(loader, "use_files_q8_0_embedding", lambda *args: frozenset())
        return load_model(folder, dtype=dtype, kernels="torch")


@pytest.mark.parametrize("half", ["F16", "BF16"])
def test_a_half_precision_embedding_stays_as_the_file_stores_it(
    native, monkeypatch, tmp_path, default_model_path, half
):
    """An F16/BF16 token_embd (an F16 file's) is kept in the file's dtype, its rows the
    fp32 values of before bit for bit; the projections (F16 too, q and k permuted by
    llama.cpp) serve the same logits as when every tensor was dequantized to fp32."""
    folder = save_random_model(tmp_path / "tiny", "LlamaConfig", seed=7, vocab_size=NUM_TOKENS)
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / file).write_bytes((default_model_path / file).read_bytes())
    out = tmp_path / "tiny.gguf"
    write_gguf(folder, out, num_tokens=NUM_TOKENS, quant=half, embedding_quant=half)
    gguf_folder = resolve_model_folder(out)
    new = load_model(gguf_folder)
    assert new.embed_tokens.weight.dtype == gguf._HALF_TYPES[half]
    with monkeypatch.context() as patch:  # as before: every tensor dequantized to fp32
        patch.setattr(gguf, "_HALF_TYPES", {})
        old = load_model(gguf_folder)
    assert old.embed_tokens.weight.dtype == torch.float32
    ids = torch.arange(new.config.vocab_size)
    assert torch.equal(new.embed(ids), old.embed_tokens.weight)
    assert torch.equal(_logits(new, PROMPT), _logits(old, PROMPT))
