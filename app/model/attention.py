"""Paged attention over a flat batch that mixes decode tokens and prefill chunks.

Every new token attends to its whole context: the keys already in the cache plus the
ones of this step, which are written to the cache first, so a token is computed the
same way whether its neighbours arrived in the same chunk or in an earlier step. With a
sliding window (Mistral), the token at position p sees keys p - window + 1 .. p only:
the others are masked (weight exactly 0), and the native kernel skips their blocks.

Queries are split into *groups*, each computed by one gather of whole KV blocks and a
pair of batched matmuls (scores, then probabilities times values):
- a decode group: one new token for each of n sequences whose contexts fall in the
  same key bucket;
- a prefill group: a run of consecutive new tokens of one sequence with the same bucket.

Batch invariance (`batch_invariant=True`): a query at position p always attends over
exactly `key_bucket(p + 1)` keys, padded with masked slots, and its matmul shapes
depend only on p (plus a row count at least `min_query_rows`, from which the matmul
kernels give every row the same bits). So its result never depends on which other
sequences share the step or where the scheduler cut the prompt into chunks. (Masked
padding alone is not enough: measured, the sum over 200 keys changes when 56 zero
keys are appended.) Otherwise decode tokens share one group padded to the longest
context, and a prefill chunk is one group: fewer, larger matmuls.

The cache is laid out per layer as [num_kv_heads, num_blocks, block_size, head_dim],
so the blocks one KV head of one sequence reads gather into one contiguous
[context, head_dim] matrix, which the batched matmuls take as is.

Backend "native" (CPU, fp32, when app.native could be built) replaces all of the above
with one call per layer: lamina's C kernel reads each token's blocks in place (no
gather, no padding, no groups) and computes every query on its own over exactly its
visible keys, so it is batch invariant by construction.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from app.model.kv_cache import write_kv
from app.native import NativeKernels

MIN_KEY_BUCKET = 64  # tokens: below this, more groups cost more than padding saves


def key_bucket(num_keys: int, block_size: int) -> int:
    """Keys a query with `num_keys` visible keys attends over: a function of num_keys only.

    Rounded up to 64 tokens, then to a quarter of the power of two below (at most
    25% padding), and always to whole blocks.
    """
    granule = max(MIN_KEY_BUCKET, (1 << (max(num_keys, 1).bit_length() - 1)) // 4)
    granule = -(-granule // block_size) * block_size
    return -(-num_keys // granule) * granule


@dataclass
class AttentionGroup:
    """Queries computed together: rows [row_start, row_end) of the flat batch."""

    row_start: int
    row_end: int
    num_seqs: int  # K/V sets gathered: the decode sequences, or 1 for a prefill run
    num_keys: int  # L: keys every query of the group attends over (masked past its own)
    # [num_seqs * num_kv_heads * L / block_size] int64: rows of the flat cache view
    # [num_kv_heads * num_blocks, block_size * head_dim], ordered (seq, head, block)
    kv_rows: torch.Tensor
    # additive mask, 0 or -inf: [num_seqs, 1, L] (decode) or [num_queries, 1, L] (prefill)
    mask: torch.Tensor
    is_decode: bool


@dataclass
class AttentionMetadata:
    """Where each token of the flat batch writes its K/V and what it reads. Built once a step."""

    slot_mapping: torch.Tensor  # [N] int64: cache slot (block * block_size + offset) per token
    groups: list[AttentionGroup] = field(default_factory=list)  # in row order, covering 0..N
    min_query_rows: int = 1  # pad a group's query rows up to this (kernel invariance)
    num_decode_tokens: int = 0  # the first D rows are single-token sequences
    # "bmm": gather + two batched matmuls; "sdpa": fused kernel (CUDA); "native": app.native
    backend: str = "bmm"
    native: NativeAttentionInputs | None = None  # backend "native" only
    sliding_window: int | None = None  # a token attends to its last `sliding_window` keys
    # The same batch for the layers with a window of their own (Gemma's local layers):
    # built when build_attention_metadata is given a `local_window`.
    local: AttentionMetadata | None = None


@dataclass
class NativeAttentionInputs:
    """What the native kernel reads per step: each token's table row and key count."""

    kernels: NativeKernels
    block_tables: torch.Tensor  # [S, max_blocks] int32, padded with block 0
    token_seq: torch.Tensor  # [N] int32: the token's row of block_tables
    num_keys: torch.Tensor  # [N] int32: keys the token attends over (its position + 1)

    @classmethod
    def build(
        cls, spans: list[_SeqSpan], kernels: NativeKernels, num_blocks: int
    ) -> NativeAttentionInputs:
        """The C kernel trusts these block ids, so they are checked here, once a step: a
        bookkeeping bug must fail the step with an error, not read outside the cache.
        (Tables too short for their tokens already fail where the slots are computed.)"""
        for span in spans:
            table = span.block_table
            if table and not 0 <= min(table) <= max(table) < num_blocks:
                raise ValueError("a block table names a block outside the KV cache")
        width = max(len(span.block_table) for span in spans)
        tables = [span.block_table + [0] * (width - len(span.block_table)) for span in spans]
        token_seq, num_keys = [], []
        for index, span in enumerate(spans):
            token_seq += [index] * span.num_new
            num_keys += range(span.num_context + 1, span.num_context + span.num_new + 1)
        return cls(
            kernels,
            torch.tensor(tables, dtype=torch.int32),
            torch.tensor(token_seq, dtype=torch.int32),
            torch.tensor(num_keys, dtype=torch.int32),
        )


@dataclass
class _SeqSpan:
    """One sequence of the batch, in host ints."""

    row_start: int
    num_new: int
    num_context: int
    block_table: list[int]


def build_attention_metadata(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    num_blocks: int,
    num_kv_heads: int,
    device: torch.device,
    batch_invariant: bool = True,
    min_query_rows: int = 1,
    backend: str = "bmm",
    mask_dtype: torch.dtype = torch.float32,
    native: NativeKernels | None = None,
    sliding_window: int | None = None,
    local_window: int | None = None,
) -> tuple[torch.Tensor, AttentionMetadata]:
    """Positions [N] and attention metadata of a batch, from host lists.

    query_lens[b]: new tokens of sequence b this step; context_lens[b]: tokens already
    cached; block_tables[b]: its block ids (must cover context + new tokens).
    Single-token sequences should come first, sorted by key bucket, so decode groups
    are few; any order is correct. backend "sdpa" (CUDA) merges groups as when not
    invariant: its fused kernel walks keys in fixed tiles, so masked padding adds
    exact zeros (unverified on hardware: see docs/performance.md). backend "native"
    needs `native` (the compiled kernels) and builds no groups. `local_window` also
    builds `metadata.local`, the same batch seen through that window.
    """
    args = (query_lens, context_lens, block_tables, block_size, num_blocks, num_kv_heads, device)
    options = dict(batch_invariant=batch_invariant, min_query_rows=min_query_rows)
    options.update(backend=backend, mask_dtype=mask_dtype, native=native)
    positions, metadata = _build_metadata(*args, **options, sliding_window=sliding_window)
    if local_window is not None:
        if metadata.native is not None:  # the kernel takes the window per call
            metadata.local = replace(metadata, sliding_window=local_window)
        else:  # the window is in the groups' masks
            _, metadata.local = _build_metadata(*args, **options, sliding_window=local_window)
    return positions, metadata


def _build_metadata(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    num_blocks: int,
    num_kv_heads: int,
    device: torch.device,
    batch_invariant: bool,
    min_query_rows: int,
    backend: str,
    mask_dtype: torch.dtype,
    native: NativeKernels | None,
    sliding_window: int | None,
) -> tuple[torch.Tensor, AttentionMetadata]:
    if backend not in ("bmm", "sdpa", "native"):
        raise ValueError(f"unknown attention backend {backend!r}")
    if (backend == "native") != (native is not None):
        raise ValueError('the "native" backend, and only it, takes the native kernels')
    spans, row = [], 0
    for num_new, num_context, table in zip(query_lens, context_lens, block_tables):
        spans.append(_SeqSpan(row, num_new, num_context, table))
        row += num_new
    positions, slots = _positions_and_slots(spans, block_size)
    metadata = AttentionMetadata(
        slots.to(device),
        min_query_rows=min_query_rows,
        backend=backend,
        sliding_window=sliding_window,
    )
    if native is not None:
        metadata.native = NativeAttentionInputs.build(spans, native, num_blocks)
        return positions, metadata
    num_decodes = 0
    while num_decodes < len(spans) and spans[num_decodes].num_new == 1:
        num_decodes += 1
    metadata.num_decode_tokens = num_decodes
    per_bucket = batch_invariant and backend == "bmm"
    plan = _GroupBuilder(
        block_size, num_blocks, num_kv_heads, device, per_bucket, mask_dtype, sliding_window
    )
    metadata.groups = plan.decode_groups(spans[:num_decodes])
    for span in spans[num_decodes:]:
        metadata.groups.extend(plan.prefill_groups(span))
    return positions.to(device), metadata


def _positions_and_slots(spans: list[_SeqSpan], block_size: int):
    positions, slots = [], []
    for span in spans:
        table = span.block_table
        for pos in range(span.num_context, span.num_context + span.num_new):
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    return torch.tensor(positions, dtype=torch.int64), torch.tensor(slots, dtype=torch.int64)


class _GroupBuilder:
    """Cuts decode sequences and prefill chunks into AttentionGroups (host side)."""

    def __init__(
        self,
        block_size: int,
        num_blocks: int,
        num_kv_heads: int,
        device: torch.device,
        batch_invariant: bool,
        mask_dtype: torch.dtype = torch.float32,
        sliding_window: int | None = None,
    ) -> None:
        self.sliding_window = sliding_window
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.num_kv_heads = num_kv_heads
        self.mask_dtype = mask_dtype
        self.device = device
        self.batch_invariant = batch_invariant

    def num_keys_for(self, visible: int) -> int:
        if self.batch_invariant:
            return key_bucket(visible, self.block_size)
        return -(-visible // self.block_size) * self.block_size

    def decode_groups(self, spans: list[_SeqSpan]) -> list[AttentionGroup]:
        """Consecutive decode sequences with the same key count share one group."""
        if not spans:
            return []
        if not self.batch_invariant:
            longest = max(s.num_context + 1 for s in spans)
            return [self._decode_group(spans, self.num_keys_for(longest))]
        groups, start = [], 0
        for end in range(1, len(spans) + 1):
            num_keys = self.num_keys_for(spans[start].num_context + 1)
            if end == len(spans) or self.num_keys_for(spans[end].num_context + 1) != num_keys:
                groups.append(self._decode_group(spans[start:end], num_keys))
                start = end
        return groups

    def prefill_groups(self, span: _SeqSpan) -> list[AttentionGroup]:
        """Runs of the chunk's tokens whose key count is the same (one run if not invariant)."""
        first, end = span.num_context, span.num_context + span.num_new  # positions
        if not self.batch_invariant:
            return [self._prefill_group(span, first, end, self.num_keys_for(end))]
        groups, run_start = [], first
        for pos in range(first + 1, end + 1):
            num_keys = self.num_keys_for(run_start + 1)
            if pos == end or self.num_keys_for(pos + 1) != num_keys:
                groups.append(self._prefill_group(span, run_start, pos, num_keys))
                run_start = pos
        return groups

    def _decode_group(self, spans: list[_SeqSpan], num_keys: int) -> AttentionGroup:
        seq_lens = torch.tensor([s.num_context + 1 for s in spans])
        key_index = torch.arange(num_keys)
        visible = key_index[None, :] < seq_lens[:, None]  # [n, L]
        if self.sliding_window is not None:  # and inside the window of the new token
            visible &= key_index[None, :] >= seq_lens[:, None] - self.sliding_window
        mask = _additive_mask(visible)
        return AttentionGroup(
            row_start=spans[0].row_start,
            row_end=spans[-1].row_start + 1,
            num_seqs=len(spans),
            num_keys=num_keys,
            kv_rows=self._kv_rows([s.block_table for s in spans], num_keys),
            mask=mask[:, None, :].to(self.device, self.mask_dtype),
            is_decode=True,
        )

    def _prefill_group(
        self, span: _SeqSpan, first_pos: int, end_pos: int, num_keys: int
    ) -> AttentionGroup:
        query_pos = torch.arange(first_pos, end_pos)
        key_pos = torch.arange(num_keys)[None, :]
        visible = key_pos <= query_pos[:, None]  # causal: [T, L]
        if self.sliding_window is not None:
            visible &= key_pos > query_pos[:, None] - self.sliding_window
        row_start = span.row_start + first_pos - span.num_context
        return AttentionGroup(
            row_start=row_start,
            row_end=row_start + end_pos - first_pos,
            num_seqs=1,
            num_keys=num_keys,
            kv_rows=self._kv_rows([span.block_table], num_keys),
            mask=_additive_mask(visible)[:, None, :].to(self.device, self.mask_dtype),
            is_decode=False,
        )

    def _kv_rows(self, tables: list[list[int]], num_keys: int) -> torch.Tensor:
        """Flat cache rows (seq, head, block) of the first num_keys keys of each table.

        Blocks past a table's end pad with block 0: read, then masked out.
        """
        num_blocks = num_keys // self.block_size
        padded = [t[:num_blocks] + [0] * (num_blocks - len(t[:num_blocks])) for t in tables]
        blocks = torch.tensor(padded, dtype=torch.int64)  # [n, nb]
        head_offsets = torch.arange(self.num_kv_heads)[None, :, None] * self.num_blocks
        return (blocks[:, None, :] + head_offsets).flatten().to(self.device)  # (seq, head, block)


def _additive_mask(visible: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(visible.shape, dtype=torch.float32)
    return mask.masked_fill_(~visible, float("-inf"))


# --- the per-layer computation -------------------------------------------------------------


def paged_attention(
    query: torch.Tensor,
    new_kv: torch.Tensor,
    layer_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend. Returns [N, num_heads * head_dim].

    softcap (Gemma 2): scores become softcap * tanh(scores / softcap) before the mask;
    the "bmm" and "native" backends compute it (on CUDA the model picks "bmm").

    query [N, num_heads, head_dim] (rotated; any strides); new_kv [N, 2 * num_kv_heads,
    head_dim]: the new keys, then the new values; layer_cache [2, num_kv_heads,
    num_blocks, block_size, head_dim]: this layer's keys and values.
    """
    write_kv(layer_cache, new_kv, metadata.slot_mapping)
    if softcap is not None and metadata.backend == "sdpa":
        raise ValueError("the 'sdpa' attention backend has no logit soft-capping")
    if metadata.native is not None:
        inputs = metadata.native
        return inputs.kernels.paged_attention(
            query, layer_cache[0], layer_cache[1], inputs.block_tables, inputs.token_seq,
            inputs.num_keys, scale, metadata.sliding_window, softcap,
        )  # fmt: skip
    num_tokens, num_heads, head_dim = query.shape
    if metadata.backend == "sdpa":
        attend = _attend_sdpa
    else:
        attend = functools.partial(_attend, softcap=softcap)
    if len(metadata.groups) == 1 and metadata.groups[0].row_end == num_tokens:
        return attend(query, layer_cache, metadata.groups[0], metadata.min_query_rows, scale)
    # Rows no group covers (a CUDA graph's padding) stay zero.
    out = query.new_zeros(num_tokens, num_heads * head_dim)
    for group in metadata.groups:
        rows = slice(group.row_start, group.row_end)
        out[rows] = attend(query[rows], layer_cache, group, metadata.min_query_rows, scale)
    return out


def _attend(
    query: torch.Tensor,  # [T, num_heads, head_dim]: the group's rows
    layer_cache: torch.Tensor,
    group: AttentionGroup,
    min_query_rows: int,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:  # [T, num_heads * head_dim]
    """One group: an item is one (sequence, KV head) with its query rows; the items'
    matmuls run as one batch, each over the group's num_keys gathered keys."""
    num_queries, num_heads, head_dim = query.shape
    num_kv_heads = layer_cache.shape[1]
    group_size = num_heads // num_kv_heads
    if group.is_decode:  # item (seq, head): that token's group_size query heads
        rows = group_size
        queries = _scaled_rows(
            query.view(group.num_seqs, num_kv_heads, group_size, head_dim), scale, min_query_rows
        )
    else:  # item (head): every query token of the run, group_size rows each
        rows = num_queries * group_size
        by_head = query.view(num_queries, num_kv_heads, group_size, head_dim).transpose(0, 1)
        queries = _scaled_rows(by_head, scale, min_query_rows, merge_rows=True)
    num_items, padded_rows = queries.shape[0], queries.shape[1]
    keys = gather_blocks(layer_cache[0], group).view(num_items, group.num_keys, head_dim)
    scores = torch.bmm(queries, keys.transpose(1, 2))  # [items, padded rows, L]
    if softcap is not None:  # before the mask, as transformers does
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    if group.is_decode:  # [n, heads * padded rows, L] + [n, 1, L]: padding rows too
        scores.view(group.num_seqs, -1, group.num_keys).add_(group.mask)
    else:  # [heads, T, group_size, L] + [T, 1, L]; padding rows (if any) come after
        real = scores[:, :rows].view(num_kv_heads, num_queries, group_size, -1)
        real.add_(group.mask)
    probs = _softmax(scores)
    values = gather_blocks(layer_cache[1], group).view(num_items, group.num_keys, head_dim)
    out = torch.bmm(probs, values)  # [items, padded rows, head_dim]
    if padded_rows != rows:
        out = out[:, :rows]
    if group.is_decode:  # items are (seq, head): already token-major
        return out.reshape(num_queries, num_heads * head_dim)
    out = out.view(num_kv_heads, num_queries, group_size, head_dim).transpose(0, 1)
    return out.reshape(num_queries, num_heads * head_dim)


def _attend_sdpa(
    query: torch.Tensor,  # [T, num_heads, head_dim]: the group's rows
    layer_cache: torch.Tensor,
    group: AttentionGroup,
    min_query_rows: int,
    scale: float,
) -> torch.Tensor:  # [T, num_heads * head_dim]
    """The same groups through torch's fused attention (memory-efficient kernel on CUDA).

    GQA without copies: a KV head's group_size query heads (decode) or T * group_size
    query rows (prefill) act as that head's queries.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    num_queries, num_heads, head_dim = query.shape
    num_kv_heads = layer_cache.shape[1]
    group_size = num_heads // num_kv_heads
    shape = (group.num_seqs, num_kv_heads, group.num_keys, head_dim)
    keys = gather_blocks(layer_cache[0], group).view(shape)
    values = gather_blocks(layer_cache[1], group).view(shape)
    if group.is_decode:  # [n, kv heads, group_size, dim]; mask [n, 1, 1, L]
        queries = query.view(group.num_seqs, num_kv_heads, group_size, head_dim)
        mask = group.mask[:, None]
    else:  # [1, kv heads, T * group_size, dim]; mask [1, 1, T * group_size, L]
        by_head = query.view(num_queries, num_kv_heads, group_size, head_dim).transpose(0, 1)
        queries = by_head.reshape(1, num_kv_heads, num_queries * group_size, head_dim)
        mask = group.mask.expand(num_queries, group_size, group.num_keys)
        mask = mask.reshape(1, 1, num_queries * group_size, group.num_keys)
    backends = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(backends):
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
    if group.is_decode:
        return out.reshape(num_queries, num_heads * head_dim)
    out = out.view(num_kv_heads, num_queries, group_size, head_dim).transpose(0, 1)
    return out.reshape(num_queries, num_heads * head_dim)


def _scaled_rows(
    query: torch.Tensor, scale: float, min_rows: int, merge_rows: bool = False
) -> torch.Tensor:
    """query [A, B, R, D] * scale as a contiguous [A * B, max(R, min_rows), D] batch
    (merge_rows: [A, B * R rounded up to min_rows, D]); padding rows are zero."""
    a, b, r, d = query.shape
    if merge_rows:
        items, rows = a, b * r
    else:
        items, rows = a * b, r
    padded = max(rows, min_rows)
    if padded == rows:
        out = query.new_empty(a, b, r, d)
        torch.mul(query, scale, out=out)
        return out.view(items, rows, d)
    out = query.new_zeros(items, padded, d)
    torch.mul(query, scale, out=out[:, :rows].view(a, b, r, d))
    return out


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    if scores.dtype == torch.float32:
        return torch.softmax(scores, dim=-1)
    # In fp32 whatever the model dtype, as the reference implementation does.
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)


def gather_blocks(cache: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
    """The group's blocks, (seq, head, block) order: [n * num_kv_heads * nb, block * dim].

    cache: keys or values of one layer, [num_kv_heads, num_blocks, block_size, head_dim].
    """
    num_kv_heads, num_blocks, block_size, head_dim = cache.shape
    flat = cache.view(num_kv_heads * num_blocks, block_size * head_dim)
    # index_select copies whole rows; measured ~4x faster than advanced indexing on CPU.
    return flat.index_select(0, group.kv_rows)


def calibrate_min_query_rows(device: torch.device, dtype: torch.dtype, head_dim: int) -> int:
    """Query rows from which the attention matmuls give each row the same bits (see
    linear.calibrate_min_rows): the larger of the scores and the values products."""
    from app.model.linear import calibrate_min_rows

    generator = torch.Generator().manual_seed(4321)
    needed = 1
    for num_keys in (64, 256):
        keys = torch.randn(1, num_keys, head_dim, generator=generator).to(device, dtype)
        values = torch.randn(1, num_keys, head_dim, generator=generator).to(device, dtype)

        def scores(q: torch.Tensor, keys=keys) -> torch.Tensor:
            return torch.bmm(q.to(dtype)[None], keys.transpose(1, 2))[0]

        def weighted(p: torch.Tensor, values=values) -> torch.Tensor:
            return torch.bmm(p.to(dtype)[None], values)[0]

        needed = max(needed, calibrate_min_rows(scores, head_dim, device))
        needed = max(needed, calibrate_min_rows(weighted, num_keys, device))
    return needed
