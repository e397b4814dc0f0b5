"""Paged attention vs a dense causal reference, and the metadata it reads."""

from __future__ import annotations

import math

import torch

from app.model.attention import build_attention_metadata, paged_attention

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 6, 2, 8, 4, 40
CPU = torch.device("cpu")


def reference_attention(q, k, v, num_context):
    """Dense causal attention of new queries [T, H, D] over a whole context [S, KVH, D] (fp64)."""
    group = NUM_HEADS // NUM_KV_HEADS
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", q.double(), k) / math.sqrt(HEAD_DIM)
    query_pos = torch.arange(num_context, num_context + q.shape[0])[:, None]
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > query_pos, float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), v)


def test_mixed_batch_matches_dense_attention():
    """Decodes (different context lengths), a chunk after a prefix, and a fresh prefill."""
    generator = torch.Generator().manual_seed(0)
    # (context already cached, new tokens): decodes first, as the runner orders them.
    shapes = [(9, 1), (1, 1), (20, 1), (7, 6), (0, 11)]
    free_blocks = torch.randperm(NUM_BLOCKS, generator=generator).tolist()
    tables = []
    for context, new in shapes:
        num_blocks = -(-(context + new) // BLOCK_SIZE)
        tables.append([free_blocks.pop() for _ in range(num_blocks)])

    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    key_cache = rand(NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    value_cache = rand(NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    # Full K/V history of each sequence; the cached part goes into its blocks first.
    histories = [
        (rand(c + n, NUM_KV_HEADS, HEAD_DIM), rand(c + n, NUM_KV_HEADS, HEAD_DIM))
        for c, n in shapes
    ]
    for (context, _), table, (k, v) in zip(shapes, tables, histories):
        for pos in range(context):
            block, row = table[pos // BLOCK_SIZE], pos % BLOCK_SIZE
            key_cache[block, row], value_cache[block, row] = k[pos], v[pos]

    positions, metadata = build_attention_metadata(
        [n for _, n in shapes], [c for c, _ in shapes], tables, BLOCK_SIZE, CPU, torch.float32
    )
    q = rand(sum(n for _, n in shapes), NUM_HEADS, HEAD_DIM)
    new_k = torch.cat([k[c:] for (c, _), (k, _) in zip(shapes, histories)])
    new_v = torch.cat([v[c:] for (c, _), (_, v) in zip(shapes, histories)])
    out = paged_attention(q, new_k, new_v, key_cache, value_cache, metadata, HEAD_DIM**-0.5)

    assert metadata.num_decode_tokens == 3
    expected_positions = [p for c, n in shapes for p in range(c, c + n)]
    assert positions.tolist() == expected_positions
    start = 0
    for (context, new), (k, v) in zip(shapes, histories):
        rows = slice(start, start + new)
        expected = reference_attention(q[rows], k, v, context)
        torch.testing.assert_close(out[rows].double(), expected, atol=1e-5, rtol=1e-5)
        start += new
    # The new tokens' K/V landed in their slots.
    for slot, k in zip(metadata.slot_mapping.tolist(), new_k):
        assert torch.equal(key_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[slot], k)


def test_slots_follow_the_block_table():
    positions, metadata = build_attention_metadata([3], [5], [[7, 2, 9]], 4, CPU, torch.float32)
    assert positions.tolist() == [5, 6, 7]
    # position p -> block_table[p // 4] * 4 + p % 4
    assert metadata.slot_mapping.tolist() == [2 * 4 + 1, 2 * 4 + 2, 2 * 4 + 3]
    assert metadata.seq_lens.tolist() == [8]
    assert metadata.query_start_loc.tolist() == [0, 3]


def test_decode_reads_only_blocks_up_to_the_longest_context():
    tables = [list(range(10)), list(range(10, 20))]  # tables longer than needed
    _, metadata = build_attention_metadata([1, 1], [4, 9], tables, 4, CPU, torch.float32)
    assert metadata.num_decode_tokens == 2
    # 3 blocks cover the longest context (10 tokens); the 5-token row is padded with
    # block 0, which its mask hides.
    assert metadata.decode_block_tables.tolist() == [[0, 1, 0], [10, 11, 12]]
    assert metadata.decode_mask.shape == (2, 1, 1, 12)
    visible = torch.isfinite(metadata.decode_mask[:, 0, 0]).sum(-1)
    assert visible.tolist() == [5, 10]
