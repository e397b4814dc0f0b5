"""The runner alone, driven by a tiny engine loop, generates what transformers generates."""

from __future__ import annotations

import pytest
import torch

from app.model.config import read_eos_token_ids
from app.model.kv_cache import KVCache
from app.model.runner import ModelRunner
from tests.model.helpers import NaiveBlockAllocator, generate, make_sequence

pytestmark = pytest.mark.slow
MAX_NEW_TOKENS = 32


@pytest.fixture(scope="module")
def runner(our_model, default_model_path, device_case) -> ModelRunner:
    cache = KVCache(our_model.config, 64, 16, device_case.device, device_case.dtype)
    eos = read_eos_token_ids(default_model_path)
    return ModelRunner(our_model, cache, max_model_len=2048, eos_token_ids=eos)


def hf_generate(hf_model, prompt: list[int]) -> list[int]:
    device = next(hf_model.parameters()).device
    with torch.inference_mode():
        out = hf_model.generate(
            torch.tensor([prompt], device=device),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.int64, device=device),
            do_sample=False,
            max_new_tokens=MAX_NEW_TOKENS,
            pad_token_id=2,
        )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def expected(hf_model, prompts) -> list[list[int]]:
    return [hf_generate(hf_model, p) for p in (prompts[0], prompts[2], prompts[3])]


@pytest.mark.parametrize("max_chunk_tokens", [10**9, 7])
def test_greedy_matches_transformers_generate(
    runner, expected, prompts, default_model_path, tokenizer, device_case, max_chunk_tokens
):
    """All prompts run as one continuous batch (chunked prefill mixed with decodes)."""
    seqs = [
        make_sequence(p, max_tokens=MAX_NEW_TOKENS) for p in (prompts[0], prompts[2], prompts[3])
    ]
    allocator = NaiveBlockAllocator(runner.num_blocks, runner.block_size)
    eos = read_eos_token_ids(default_model_path)
    ours = generate(runner, allocator, seqs, eos, max_chunk_tokens)
    assert "Paris" in tokenizer.decode(ours[0])
    num_equal = device_case.min_equal_greedy_tokens
    if num_equal is None:
        assert ours == expected
    else:
        assert [o[:num_equal] for o in ours] == [e[:num_equal] for e in expected]
