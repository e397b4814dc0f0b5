"""Batch invariance on the models whose layers differ most from LLaMA's (Gemma's, on the
fused stack: per-layer windows and rope tables, sandwich norms, GeGLU, soft-capped
scores) or run outside the fused stack (the generic backend's transformers modules): a
prompt's logits are the same bits alone, among other sequences, and cut into two chunks
(lamina's native kernels; the torch kernels' row padding is the same code the other
families use)."""

from __future__ import annotations

import pytest
import torch

from app.model.kv_cache import KVCache
from app.model.loader import load_model
from tests.families.conftest import UNFUSED_FAMILIES
from tests.model.helpers import Chunk, NaiveBlockAllocator, model_logits

BLOCK_SIZE = 4


def _tokens(generator, length: int) -> list[int]:
    return torch.randint(3, 49152, (length,), generator=generator).tolist()


@pytest.mark.parametrize("family", sorted({"gemma2", "gemma3", *UNFUSED_FAMILIES}))
def test_a_prompt_is_the_same_bits_alone_batched_and_chunked(family_model_paths, family, native):
    model = load_model(family_model_paths[family])
    generator = torch.Generator().manual_seed(3)
    prompt = _tokens(generator, 23)
    others = [_tokens(generator, n) for n in (1, 5, 31)]
    cache = KVCache(model.config, 96, BLOCK_SIZE, torch.device("cpu"), torch.float32)
    allocator = NaiveBlockAllocator(96, BLOCK_SIZE)

    def fresh(tokens: list[int], capacity: int = 32) -> Chunk:
        table: list[int] = []
        allocator.reserve(table, capacity)
        return Chunk(tokens, 0, table)

    (alone,) = model_logits(model, cache, [fresh(prompt)])
    batch = [fresh(others[0]), fresh(prompt), fresh(others[1]), fresh(others[2])]
    together = model_logits(model, cache, batch)
    # The prompt in two chunks, its second beside another sequence's decode step.
    first, decoding = fresh(prompt[:10]), fresh(others[0])
    (head,) = model_logits(model, cache, [first])
    model_logits(model, cache, [decoding])
    step = [Chunk([7], 1, decoding.block_table), Chunk(prompt[10:], 10, first.block_table)]
    _, tail = model_logits(model, cache, step)
    assert torch.equal(together[1], alone)
    assert torch.equal(torch.cat([head, tail]), alone)
