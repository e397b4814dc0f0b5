"""The input embedding in the storage its values need (app/model/embedding.py): a bf16
checkpoint's matrix stays bf16 under an fp32 model, and every row gathered, every logit,
is bit for bit what the fp32 matrix of before gave."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from app.model.embedding import PanelEmbedding, TokenEmbedding, stored_dtype
from app.model.kv_cache import KVCache
from app.model.loader import load_model
from app.native.panels import INT4
from tests.model.helpers import Chunk, NaiveBlockAllocator, model_logits, save_random_llama

PROMPT = [1, 17, 200, 5, 5, 255, 0, 63, 64, 128]
WEIGHT_DTYPES = (None, torch.bfloat16, torch.float16, torch.int8, INT4)


def _save_as(folder, out, dtype: torch.dtype):
    """`folder`'s model with every tensor in `dtype` (the other files copied)."""
    out.mkdir()
    for file in folder.iterdir():
        if file.name != "model.safetensors":
            (out / file.name).write_bytes(file.read_bytes())
    tensors = load_file(folder / "model.safetensors")
    save_file({k: v.to(dtype) for k, v in tensors.items()}, out / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    return out


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def bf16_and_fp32(request, tmp_path_factory):
    """The same random model saved in bf16 and as those values in fp32 (what the loader
    held before: every tensor converted to the model dtype)."""
    root = tmp_path_factory.mktemp("embedding")
    saved = save_random_llama(root / "saved", tie_word_embeddings=request.param)
    bf16 = _save_as(saved, root / "bf16", torch.bfloat16)
    return bf16, _save_as(bf16, root / "fp32", torch.float32)


def _logits(model) -> torch.Tensor:
    cache = KVCache(model.config, 4, 16, torch.device("cpu"), torch.float32)
    table: list[int] = []
    NaiveBlockAllocator(4, 16).reserve(table, len(PROMPT))
    (logits,) = model_logits(model, cache, [Chunk(PROMPT, 0, table)])
    return logits  # [len(PROMPT), vocab]


def test_the_stored_dtype_is_the_files_where_the_model_dtype_holds_it():
    assert stored_dtype(torch.bfloat16, torch.float32) == torch.bfloat16
    assert stored_dtype(torch.float16, torch.float32) == torch.float16
    assert stored_dtype(torch.float32, torch.float32) == torch.float32
    assert stored_dtype(torch.float16, torch.bfloat16) == torch.bfloat16  # as before
    assert stored_dtype(torch.float32, torch.bfloat16) == torch.bfloat16


@pytest.mark.parametrize("weight_dtype", WEIGHT_DTYPES, ids=str)
def test_a_bf16_embedding_gives_the_fp32_matrixs_rows_and_logits(
    native, bf16_and_fp32, weight_dtype
):
    bf16, fp32 = bf16_and_fp32
    new = load_model(bf16, weight_dtype=weight_dtype)
    old = load_model(fp32, weight_dtype=weight_dtype)  # the fp32 matrix of before
    ids = torch.arange(new.config.vocab_size)
    expected = load_file(fp32 / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(new.embed(ids), expected)  # every row, bit for bit
    assert new.embed(ids).dtype == torch.float32
    assert torch.equal(_logits(new), _logits(old))
    if isinstance(new.embed_tokens, PanelEmbedding):  # a tied head in fp32 panels
        assert new.config.tie_word_embeddings
    else:
        assert new.embed_tokens.weight.dtype == torch.bfloat16  # half the bytes


def test_reference_kernels_keep_one_tied_matrix_at_the_model_dtype(bf16_and_fp32):
    bf16, _ = bf16_and_fp32
    model = load_model(bf16, kernels="reference")
    assert model.lm_head.weight.dtype == torch.float32  # F.linear's operand
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.embed_tokens.weight
    else:
        assert isinstance(model.embed_tokens, TokenEmbedding)
        assert model.embed_tokens.weight.dtype == torch.bfloat16
