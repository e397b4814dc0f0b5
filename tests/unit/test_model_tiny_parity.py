"""Small random LLaMA variants: our model reproduces transformers' logits through the cache."""

from __future__ import annotations

import json

import pytest
import torch

from app.model.kv_cache import KVCache
from app.model.linear import ALL_GENERATED, ALL_PROMPT
from app.model.loader import load_model
from tests.model.helpers import (
    Chunk,
    NaiveBlockAllocator,
    check_logits_parity,
    model_logits,
    save_random_llama,
)

BLOCK_SIZE = 4  # small blocks: every test crosses many block boundaries

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # small, so all three frequency bands occur
}
VARIANTS = {
    "llama3_rope": dict(rope_parameters=LLAMA3_ROPE),
    "tied_embeddings": dict(tie_word_embeddings=True),
    "biases_and_head_dim": dict(attention_bias=True, mlp_bias=True, head_dim=24),
    "multi_head_sharded": dict(num_key_value_heads=4, max_shard_size="100KB"),
}


def check_parity(model_dir, prompt_len: int = 37, seed: int = 0) -> None:
    check_logits_parity(model_dir, prompt_len, seed)


def test_tiny_model_fixture_gqa_untied(tiny_model_path):
    check_parity(tiny_model_path)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_variants(tmp_path, variant):
    check_parity(save_random_llama(tmp_path, **VARIANTS[variant]))


def test_legacy_rope_scaling_layout(tmp_path):
    """Older configs: rope_theta at top level and rope_scaling with the key `type`."""
    save_random_llama(tmp_path, rope_parameters=LLAMA3_ROPE)
    path = tmp_path / "config.json"
    raw = json.loads(path.read_text())
    scaling = dict(raw.pop("rope_parameters"))
    raw["rope_theta"] = scaling.pop("rope_theta")
    scaling["type"] = scaling.pop("rope_type")
    raw["rope_scaling"] = scaling
    path.write_text(json.dumps(raw))
    check_parity(tmp_path)


def test_long_positions_with_llama3_scaling(tmp_path):
    """Positions far past original_max_position_embeddings (the scaled regime)."""
    check_parity(save_random_llama(tmp_path, rope_parameters=LLAMA3_ROPE), prompt_len=150)


def test_fp16_weights_run_prompt_rows_with_the_fp32_weights(tiny_model_path):
    """A prompt-kind forward of the fp16-weight model gives the fp32 model's bits (two
    chunks of two sequences in one step); a generated-kind one reads the fp16 weights."""
    fp32 = load_model(tiny_model_path)
    fp16 = load_model(tiny_model_path, weight_dtype=torch.float16)
    assert fp16.splits_rows_by_kind and not fp32.splits_rows_by_kind
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, fp32.config.vocab_size, (29,), generator=generator).tolist()

    def step(model, kinds):
        cache = KVCache(model.config, 64, BLOCK_SIZE, torch.device("cpu"), torch.float32)
        allocator = NaiveBlockAllocator(64, BLOCK_SIZE)
        table_a: list[int] = []
        table_b: list[int] = []
        allocator.reserve(table_a, 20)
        allocator.reserve(table_b, 9)
        chunks = [Chunk(tokens[:20], 0, table_a), Chunk(tokens[20:], 0, table_b)]
        return torch.cat(model_logits(model, cache, chunks, kinds))  # [29, vocab]

    expected = step(fp32, None)
    assert torch.equal(step(fp16, ALL_PROMPT), expected)
    assert not torch.equal(step(fp16, ALL_GENERATED), expected)
