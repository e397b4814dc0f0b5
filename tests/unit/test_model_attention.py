"""Paged attention vs a dense causal reference, its metadata, and its batch invariance."""

from __future__ import annotations

import pytest
import torch

from app.model.attention import (
    build_attention_metadata,
    calibrate_min_query_rows,
    key_bucket,
    paged_attention,
)
from app.native import native_kernels
from app.native.self_check import dense_causal_attention

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 6, 2, 8, 4, 120
CPU = torch.device("cpu")


def reference_attention(q, k, v, num_context):
    """Dense causal attention of new queries [T, H, D] over a whole context [S, KVH, D] (fp64)."""
    return dense_causal_attention(q.double(), k.double(), v.double(), num_context)


class World:
    """Random K/V histories of several sequences, their block tables, and a paged cache."""

    def __init__(self, lengths: list[int], seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        free = torch.randperm(NUM_BLOCKS, generator=self.generator).tolist()
        self.tables = [[free.pop() for _ in range(-(-n // BLOCK_SIZE))] for n in lengths]
        self.keys = [self.rand(n, NUM_KV_HEADS, HEAD_DIM) for n in lengths]
        self.values = [self.rand(n, NUM_KV_HEADS, HEAD_DIM) for n in lengths]
        self.queries = [self.rand(n, NUM_HEADS, HEAD_DIM) for n in lengths]
        # Stale junk everywhere: whatever is not masked would show in the results.
        self.cache = self.rand(2, NUM_KV_HEADS, NUM_BLOCKS, BLOCK_SIZE, HEAD_DIM)
        self.key_cache, self.value_cache = self.cache[0], self.cache[1]

    def rand(self, *shape):
        return torch.randn(*shape, generator=self.generator)

    def fill(self, seq: int, num_tokens: int) -> None:
        """Put the first num_tokens K/V of a sequence into its blocks (earlier steps)."""
        for pos in range(num_tokens):
            block, row = self.tables[seq][pos // BLOCK_SIZE], pos % BLOCK_SIZE
            self.key_cache[:, block, row] = self.keys[seq][pos]
            self.value_cache[:, block, row] = self.values[seq][pos]

    def step(self, work: list[tuple[int, int, int]], **options) -> list[torch.Tensor]:
        """Run one attention step; work = (seq, context, new tokens). Per-seq outputs."""
        query_lens = [n for _, _, n in work]
        positions, metadata = build_attention_metadata(
            query_lens,
            [c for _, c, _ in work],
            [self.tables[s] for s, _, _ in work],
            BLOCK_SIZE,
            NUM_BLOCKS,
            NUM_KV_HEADS,
            CPU,
            **options,
        )
        q = torch.cat([self.queries[s][c : c + n] for s, c, n in work])
        k = torch.cat([self.keys[s][c : c + n] for s, c, n in work])
        v = torch.cat([self.values[s][c : c + n] for s, c, n in work])
        new_kv = torch.cat([k, v], dim=1)  # keys then values, as the fused projection has them
        out = paged_attention(q, new_kv, self.cache, metadata, HEAD_DIM**-0.5)
        assert positions.tolist() == [p for _, c, n in work for p in range(c, c + n)]
        return list(out.view(-1, NUM_HEADS, HEAD_DIM).split(query_lens))


@pytest.mark.parametrize(
    "batch_invariant, backend", [(True, "bmm"), (False, "bmm"), (True, "sdpa"), (True, "native")]
)
def test_mixed_batch_matches_dense_attention(batch_invariant, backend):
    """Decodes (different context lengths), a chunk after a prefix, and a fresh prefill."""
    # (context already cached, new tokens): decodes first, as the runner orders them.
    shapes = [(9, 1), (1, 1), (70, 1), (20, 1), (7, 6), (0, 11), (60, 30)]
    world = World([c + n for c, n in shapes])
    for seq, (context, _) in enumerate(shapes):
        world.fill(seq, context)
    work = [(seq, c, n) for seq, (c, n) in enumerate(shapes)]
    native = native_kernels() if backend == "native" else None
    outputs = world.step(
        work, batch_invariant=batch_invariant, min_query_rows=4, backend=backend, native=native
    )
    for seq, ((context, _), out) in enumerate(zip(shapes, outputs)):
        expected = reference_attention(
            world.queries[seq][context:], world.keys[seq], world.values[seq], context
        )
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    # The new tokens' K/V landed in their slots (head-major cache).
    for seq, (context, new) in enumerate(shapes):
        for pos in range(context, context + new):
            block, row = world.tables[seq][pos // BLOCK_SIZE], pos % BLOCK_SIZE
            assert torch.equal(world.key_cache[:, block, row], world.keys[seq][pos])
            assert torch.equal(world.value_cache[:, block, row], world.values[seq][pos])


def test_slots_follow_the_block_table():
    positions, metadata = build_attention_metadata(
        [3], [5], [[7, 2, 9]], 4, NUM_BLOCKS, NUM_KV_HEADS, CPU
    )
    assert positions.tolist() == [5, 6, 7]
    # position p -> block_table[p // 4] * 4 + p % 4
    assert metadata.slot_mapping.tolist() == [2 * 4 + 1, 2 * 4 + 2, 2 * 4 + 3]


def test_key_buckets_depend_on_the_context_only():
    previous = 0
    for num_keys in range(1, 5000):
        bucket = key_bucket(num_keys, 16)
        assert bucket >= num_keys and bucket % 16 == 0 and bucket >= previous
        assert bucket - num_keys < max(64, num_keys // 4) + 16, num_keys  # bounded padding
        previous = bucket
    assert key_bucket(5, 48) % 48 == 0 and key_bucket(100, 48) % 48 == 0  # whole blocks


def test_decode_gathers_only_its_bucket():
    tables = [list(range(40)), list(range(40, 80)), list(range(80, 120))]
    contexts = [4, 130, 9]  # 5, 131 and 10 visible keys
    _, metadata = build_attention_metadata(
        [1, 1, 1], contexts, tables, 4, NUM_BLOCKS, NUM_KV_HEADS, CPU, batch_invariant=True
    )
    assert metadata.num_decode_tokens == 3
    # Rows 0 and 2 (64 keys) cannot share a group across row 1: three groups.
    assert [(g.row_start, g.row_end, g.num_keys) for g in metadata.groups] == [
        (0, 1, 64),
        (1, 2, 192),
        (2, 3, 64),
    ]
    for group in metadata.groups:
        assert group.kv_rows.numel() == NUM_KV_HEADS * group.num_seqs * group.num_keys // 4
    # Not invariant: one group, as long as the longest context, in whole blocks.
    _, metadata = build_attention_metadata(
        [1, 1, 1], contexts, tables, 4, NUM_BLOCKS, NUM_KV_HEADS, CPU, batch_invariant=False
    )
    assert [(g.row_start, g.row_end, g.num_keys) for g in metadata.groups] == [(0, 3, 132)]


def test_a_sequence_computes_the_same_bits_alone_or_in_any_batch():
    """Decode alone vs with others; a prompt in one chunk vs in uneven chunks next to
    decodes: every token's output must be bitwise identical (batch_invariant=True)."""
    lengths = [150, 37, 90, 66, 5]
    min_rows = calibrate_min_query_rows(CPU, torch.float32, HEAD_DIM)
    options = dict(batch_invariant=True, min_query_rows=min_rows)

    alone = World(lengths, seed=3)
    whole = [alone.step([(seq, 0, n)], **options)[0] for seq, n in enumerate(lengths)]

    crowd = World(lengths, seed=3)
    chunked: dict[int, list[torch.Tensor]] = {seq: [] for seq in range(len(lengths))}
    done = [0] * len(lengths)
    chunk_sizes = [7, 50, 1, 33, 64, 2, 100]
    step = 0
    while any(d < n for d, n in zip(done, lengths)):
        work = []
        for seq, n in enumerate(lengths):
            if done[seq] < n:
                size = min(chunk_sizes[(seq + step) % len(chunk_sizes)], n - done[seq])
                work.append((seq, done[seq], size))
        work.sort(key=lambda w: w[2] != 1)  # single-token sequences first
        for (seq, _, size), out in zip(work, crowd.step(work, **options)):
            chunked[seq].append(out)
            done[seq] += size
        step += 1
    for seq in range(len(lengths)):
        assert torch.equal(torch.cat(chunked[seq]), whole[seq]), f"sequence {seq}"


def test_native_metadata_refuses_tables_the_kernel_cannot_trust(native):
    """The C kernel reads whatever block ids it is given: a bookkeeping bug must fail the
    step with an error instead of reading outside the cache."""

    def build(table, num_context=5, num_new=1):
        return build_attention_metadata(
            [num_new], [num_context], [table], BLOCK_SIZE, NUM_BLOCKS, NUM_KV_HEADS, CPU,
            backend="native", native=native,
        )  # fmt: skip

    build([3, 7])  # 6 tokens in two blocks of 4: fine
    with pytest.raises(ValueError, match="outside the KV cache"):
        build([3, NUM_BLOCKS])
    with pytest.raises(ValueError, match="outside the KV cache"):
        build([-1, 7])
    with pytest.raises(IndexError):  # found where the slots are computed, for every backend
        build([3], num_context=4, num_new=1)  # 5 tokens, one block of 4
