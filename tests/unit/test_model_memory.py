"""Host memory of a loaded model: one copy of a tied matrix, and the start-up accounting."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from app.config import Settings
from app.model import runner as runner_module
from app.model.embedding import PanelEmbedding, TokenEmbedding
from app.model.kv_cache import KVCache
from app.model.loader import load_model
from app.model.memory_report import measure_memory
from app.model.runner import ModelRunner
from tests.model.helpers import save_random_llama

# 200 tokens: the last of 4 panels of 64 columns is partly padding
TIED = dict(tie_word_embeddings=True, vocab_size=200)


@pytest.fixture(scope="module")
def tied_model_path(tmp_path_factory):
    return save_random_llama(tmp_path_factory.mktemp("tied"), **TIED)


def test_a_tied_embedding_is_read_from_the_head_panels(native, tied_model_path):
    embedding = load_file(tied_model_path / "model.safetensors")["model.embed_tokens.weight"]
    for weight_dtype in (None, torch.float16):  # fp16: the prompt kernel's fp32 panels
        model = load_model(tied_model_path, weight_dtype=weight_dtype)
        assert isinstance(model.embed_tokens, PanelEmbedding)
        ids = torch.tensor([0, 1, 63, 64, 65, 127, 128, 199, 5, 5])
        rows = model.embed_tokens(ids)  # [10, hidden]
        assert rows.is_contiguous() and rows.dtype == torch.float32
        assert torch.equal(rows, embedding[ids])  # the same bits, row for row
        assert not any(p.numel() == embedding.numel() for p in model.parameters())


def test_an_untied_or_unpacked_embedding_stays_a_matrix(tmp_path, tied_model_path):
    untied = save_random_llama(tmp_path)
    assert isinstance(load_model(untied).embed_tokens, TokenEmbedding)
    for kernels in ("torch", "reference"):  # no fp32 panels to read from
        model = load_model(tied_model_path, kernels=kernels)
        assert isinstance(model.embed_tokens, TokenEmbedding)


def test_the_report_counts_each_copy_once(native, tied_model_path):
    model = load_model(tied_model_path)
    config = model.config
    cache = KVCache(config, 64, 16, torch.device("cpu"), torch.float32)
    report = measure_memory(model, cache)
    hidden, inter, kv = config.hidden_size, config.intermediate_size, config.kv_size
    per_layer = hidden * (hidden + 2 * kv) + hidden * hidden + 2 * hidden * inter + inter * hidden
    head_panels = -(-config.vocab_size // 64) * 64 * hidden  # the tied matrix, padded once
    layer_panels = config.num_layers * per_layer  # every width here is a multiple of 64
    assert report.packed == 4 * (layer_panels + head_panels)
    norms = (2 * config.num_layers + 1) * hidden
    assert report.weights == 4 * norms  # nothing else is left as loaded
    assert report.tables == 2 * 4 * 256 * config.head_dim  # cos and sin, 256 positions
    assert report.kv_reserved == cache.num_bytes
    assert report.kv_resident == 0 and report.rss > report.packed
    assert report.rest == report.rss - report.weights - report.packed - report.tables


def test_the_runner_logs_where_memory_goes(tiny_model_path, caplog):
    settings = Settings(model=tiny_model_path, device="cpu", block_size=4, kv_cache_gb=0.002)
    runner = ModelRunner.from_settings(settings)
    runner.warmup()
    with caplog.at_level(logging.INFO, logger="app.model.memory_report"):
        report = runner.log_memory()
    (record,) = [r for r in caplog.records if r.getMessage().startswith("memory:")]
    assert record.kv_cache_reserved_bytes == runner.kv_cache.num_bytes
    assert 0 < record.kv_cache_resident_bytes < runner.kv_cache.num_bytes  # warm-up's blocks
    assert record.packed_weights_bytes == report.packed > 0
    assert record.rss_bytes > 0


def _drafting(model_path) -> Settings:
    """The tiny model served with a second copy of itself as its draft."""
    return Settings(
        model=model_path,
        device="cpu",
        block_size=4,
        kv_cache_gb=0.002,
        speculative="draft",
        speculative_model=model_path,
    )


def test_the_draft_models_memory_is_accounted_on_its_own(tiny_model_path, caplog):
    runner = ModelRunner.from_settings(_drafting(tiny_model_path))
    runner.warmup()
    with caplog.at_level(logging.INFO, logger="app.model.memory_report"):
        report = runner.log_memory()
    (record,) = [r for r in caplog.records if r.getMessage().startswith("memory:")]
    assert "draft model" in record.getMessage()
    draft = runner.draft_runner
    assert record.draft_model_bytes == report.weights + report.packed + report.tables
    assert record.draft_kv_cache_reserved_bytes == draft.kv_cache.num_bytes
    assert record.draft_kv_cache_resident_bytes == draft.kv_cache.num_resident_bytes
    assert report.rest == report.rss - (
        report.weights + report.packed + report.tables + report.kv_resident + report.draft.held
    )


def test_start_up_loads_the_draft_before_sizing_the_caches(tiny_model_path, monkeypatch):
    loads, sizings = [], []
    load_draft_model = runner_module.load_draft_model
    num_cache_blocks = runner_module.num_cache_blocks

    def load_and_count(*args, **kwargs):
        loads.append(args)
        return load_draft_model(*args, **kwargs)

    def size_and_note(*args, draft_config=None, **kwargs):
        sizings.append((len(loads), draft_config))
        return num_cache_blocks(*args, draft_config=draft_config, **kwargs)

    monkeypatch.setattr(runner_module, "load_draft_model", load_and_count)
    monkeypatch.setattr(runner_module, "num_cache_blocks", size_and_note)
    runner = runner_module.ModelRunner.from_settings(_drafting(tiny_model_path))
    draft = runner.draft_runner
    assert sizings == [(1, draft.config)]  # the draft was in memory when the cache was sized
    assert len(loads) == 1  # and was not loaded again for its runner
    assert draft.num_blocks == runner.num_blocks
