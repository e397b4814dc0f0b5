"""Our LLaMA over the paged cache gives transformers' logits on the default model."""

from __future__ import annotations

import pytest
import torch

from app.model.kv_cache import KVCache
from tests.model.helpers import Chunk, NaiveBlockAllocator, hf_logits, model_logits

pytestmark = pytest.mark.slow
BLOCK_SIZE = 16


@pytest.fixture
def cache(our_model, device_case) -> KVCache:
    return KVCache(our_model.config, 64, BLOCK_SIZE, device_case.device, device_case.dtype)


@pytest.fixture
def allocator() -> NaiveBlockAllocator:
    return NaiveBlockAllocator(64, BLOCK_SIZE)


def table_for(allocator: NaiveBlockAllocator, num_tokens: int) -> list[int]:
    table: list[int] = []
    allocator.reserve(table, num_tokens)
    return table


def assert_close(ours: torch.Tensor, reference: torch.Tensor, atol: float) -> None:
    assert ours.shape == reference.shape
    diff = (ours - reference).abs().max().item()
    assert diff < atol, f"max |ours - transformers| = {diff:.2e}"


def test_full_prefill(our_model, hf_model, cache, allocator, prompts, device_case):
    for prompt in prompts:
        (ours,) = model_logits(
            our_model, cache, [Chunk(prompt, 0, table_for(allocator, len(prompt)))]
        )
        assert_close(ours, hf_logits(hf_model, prompt), device_case.logits_atol)


def test_prefills_batched_together(our_model, hf_model, cache, allocator, prompts, device_case):
    chunks = [Chunk(p, 0, table_for(allocator, len(p))) for p in prompts]
    for prompt, ours in zip(prompts, model_logits(our_model, cache, chunks)):
        assert_close(ours, hf_logits(hf_model, prompt), device_case.logits_atol)


@pytest.mark.parametrize("chunk_size", [5, 16, 23])
def test_prefill_in_chunks_through_cache(
    our_model, hf_model, cache, allocator, prompts, device_case, chunk_size
):
    prompt = prompts[0]  # the chat prompt: ~40 tokens, crosses block boundaries
    table = table_for(allocator, len(prompt))
    parts = []
    for start in range(0, len(prompt), chunk_size):
        chunk = Chunk(prompt[start : start + chunk_size], start, table)
        parts += model_logits(our_model, cache, [chunk])
    assert_close(torch.cat(parts), hf_logits(hf_model, prompt), device_case.logits_atol)


def test_decode_steps_through_cache(our_model, hf_model, cache, allocator, prompts, device_case):
    prompt = prompts[1]
    # A fixed continuation (teacher forcing): greedy ids from transformers itself.
    full = list(prompt)
    for _ in range(6):
        full.append(int(hf_logits(hf_model, full)[-1].argmax()))
    reference = hf_logits(hf_model, full)
    table = table_for(allocator, len(full))
    (ours,) = model_logits(our_model, cache, [Chunk(prompt, 0, table)])
    steps = [ours]
    for position in range(len(prompt), len(full)):
        steps += model_logits(our_model, cache, [Chunk([full[position]], position, table)])
    assert_close(torch.cat(steps), reference, device_case.logits_atol)


def test_mixed_batch_of_decodes_and_prefill_chunks(
    our_model, hf_model, cache, allocator, prompts, device_case
):
    """One step mixing: two decodes, a chunk after a cached prefix, and a fresh prefill."""
    chat, fox, moon, code = prompts
    tables = {
        name: table_for(allocator, len(p))
        for name, p in [("chat", chat), ("fox", fox), ("moon", moon), ("code", code)]
    }
    # Earlier steps: cache all but the last token of chat and fox, and half of moon.
    half = len(moon) // 2
    model_logits(
        our_model,
        cache,
        [
            Chunk(chat[:-1], 0, tables["chat"]),
            Chunk(fox[:-1], 0, tables["fox"]),
            Chunk(moon[:half], 0, tables["moon"]),
        ],
    )
    chat_step, fox_step, moon_step, code_step = model_logits(
        our_model,
        cache,
        [
            Chunk(chat[-1:], len(chat) - 1, tables["chat"]),
            Chunk(fox[-1:], len(fox) - 1, tables["fox"]),
            Chunk(moon[half:], half, tables["moon"]),
            Chunk(code, 0, tables["code"]),
        ],
    )
    atol = device_case.logits_atol
    assert_close(chat_step, hf_logits(hf_model, chat)[-1:], atol)
    assert_close(fox_step, hf_logits(hf_model, fox)[-1:], atol)
    assert_close(moon_step, hf_logits(hf_model, moon)[half:], atol)
    assert_close(code_step, hf_logits(hf_model, code), atol)
