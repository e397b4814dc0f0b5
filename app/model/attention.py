"""Paged attention over a flat batch that mixes decode tokens and prefill chunks.

Every sequence attends to its whole context: the prefix already in the cache plus the
tokens of this step, with the causal rule offset by the cached prefix (new token i of a
sequence with c cached tokens sees positions 0..c+i).

Batch layout (the runner orders it so): the first `num_decode_tokens` sequences have
exactly one new token each and go through one batched decode path; the remaining
sequences (prefill chunks) are computed one by one, since each is big enough to keep
the matmuls busy on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from app.model.kv_cache import write_kv


@dataclass
class PrefillSpan:
    """One multi-token sequence of the batch. Host ints, so no device sync is needed."""

    token_start: int  # first row of this sequence in the flat batch
    token_end: int  # one past its last row
    num_context_tokens: int  # tokens already in the cache before this step
    seq_len: int  # context length after this step = num_context_tokens + new tokens
    block_ids: torch.Tensor  # [ceil(seq_len / block_size)] int64, the blocks it reads
    mask: torch.Tensor | None  # [new tokens, seq_len] bool (True: attend); None: plain causal


@dataclass
class AttentionMetadata:
    """Where each token of the flat batch reads and writes K/V. Built once per step.

    B sequences, N tokens in total; decode sequences (one new token) come first.
    """

    slot_mapping: torch.Tensor  # [N] int64: cache slot where each new token's K/V goes
    query_start_loc: torch.Tensor  # [B + 1] int64: sequence b owns rows [qsl[b], qsl[b+1])
    seq_lens: torch.Tensor  # [B] int64: context length after this step
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0 past each table's end
    max_seq_len: int  # longest context in the batch (host)
    num_decode_tokens: int  # D: the first D sequences have one new token each
    # [D, max decode blocks] int64: the blocks the decode sequences read (a view of block_tables)
    decode_block_tables: torch.Tensor | None = None
    # [D, 1, 1, max decode blocks * block_size] float: 0 for context, -inf past each seq_len
    decode_mask: torch.Tensor | None = None
    prefills: list[PrefillSpan] = field(default_factory=list)  # the other sequences, in order


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def build_attention_metadata(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, AttentionMetadata]:
    """Positions [N] and attention metadata of a batch, from host lists.

    query_lens[b]: new tokens of sequence b this step; context_lens[b]: tokens already
    cached; block_tables[b]: its block ids (must cover context + new tokens).
    Sequences with one new token should come first: only that leading run takes the
    batched decode path.
    """
    num_seqs = len(query_lens)
    seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
    blocks_needed = [_ceil_div(s, block_size) for s in seq_lens]
    max_blocks = max(blocks_needed)
    padded_tables = [t[:n] + [0] * (max_blocks - n) for t, n in zip(block_tables, blocks_needed)]

    # Flat per-token indices, vectorized on the host (tiny tensors, no Python per token).
    query_lens_t = torch.tensor(query_lens, dtype=torch.int64)
    table_t = torch.tensor(padded_tables, dtype=torch.int64)  # [B, max_blocks]
    query_start_loc = torch.zeros(num_seqs + 1, dtype=torch.int64)
    torch.cumsum(query_lens_t, 0, out=query_start_loc[1:])
    seq_index = torch.repeat_interleave(torch.arange(num_seqs), query_lens_t)  # [N]
    num_tokens = int(query_start_loc[-1])
    offsets = torch.arange(num_tokens) - query_start_loc[seq_index]
    positions = torch.tensor(context_lens, dtype=torch.int64)[seq_index] + offsets
    slots = table_t[seq_index, positions // block_size] * block_size + positions % block_size

    num_decodes = 0
    while num_decodes < num_seqs and query_lens[num_decodes] == 1:
        num_decodes += 1

    table_t = table_t.to(device, non_blocking=True)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int64).to(device, non_blocking=True)
    metadata = AttentionMetadata(
        slot_mapping=slots.to(device, non_blocking=True),
        query_start_loc=query_start_loc.to(device, non_blocking=True),
        seq_lens=seq_lens_t,
        block_tables=table_t,
        max_seq_len=max(seq_lens),
        num_decode_tokens=num_decodes,
    )
    if num_decodes:
        decode_blocks = max(blocks_needed[:num_decodes])
        metadata.decode_block_tables = table_t[:num_decodes, :decode_blocks]
        key_index = torch.arange(decode_blocks * block_size, device=device)
        is_past_end = key_index[None, :] >= seq_lens_t[:num_decodes, None]  # [D, L]
        mask = torch.zeros(is_past_end.shape, device=device, dtype=dtype)
        metadata.decode_mask = mask.masked_fill_(is_past_end, float("-inf"))[:, None, None, :]
    starts = query_start_loc.tolist()
    for b in range(num_decodes, num_seqs):
        metadata.prefills.append(
            _prefill_span(starts[b], starts[b + 1], context_lens[b], table_t[b, : blocks_needed[b]])
        )
    return positions.to(device, non_blocking=True), metadata


def _prefill_span(start: int, end: int, num_context: int, block_ids: torch.Tensor) -> PrefillSpan:
    num_new = end - start
    seq_len = num_context + num_new
    mask = None
    if num_context:
        device = block_ids.device
        query_pos = torch.arange(num_context, seq_len, device=device)  # [num_new]
        key_pos = torch.arange(seq_len, device=device)  # [seq_len]
        mask = key_pos[None, :] <= query_pos[:, None]  # [num_new, seq_len]
    return PrefillSpan(start, end, num_context, seq_len, block_ids, mask)


def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend. Returns [N, num_heads, head_dim].

    query [N, num_heads, head_dim]; key/value [N, num_kv_heads, head_dim];
    key_cache/value_cache [num_blocks, block_size, num_kv_heads, head_dim].
    """
    write_kv(key_cache, value_cache, key, value, metadata.slot_mapping)
    outputs = []
    num_decodes = metadata.num_decode_tokens
    if num_decodes:
        outputs.append(
            decode_attention(query[:num_decodes], key_cache, value_cache, metadata, scale)
        )
    for span in metadata.prefills:
        rows = slice(span.token_start, span.token_end)
        outputs.append(
            prefill_attention(
                query[rows], key[rows], value[rows], key_cache, value_cache, span, scale
            )
        )
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """One new token per sequence: [D, num_heads, head_dim] -> [D, num_heads, head_dim].

    Gathers whole blocks (cheaper than single slots), only as many as the longest
    decode context needs; positions past a sequence's end are masked out.
    """
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    blocks = metadata.decode_block_tables.flatten()  # [D * num_blocks_read]
    # index_select copies whole blocks; measured ~3x faster than advanced indexing on CPU.
    keys = key_cache.index_select(0, blocks).view(num_seqs, -1, num_kv_heads, head_dim)
    values = value_cache.index_select(0, blocks).view(num_seqs, -1, num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(
        query.unsqueeze(2),  # [D, num_heads, 1, head_dim]
        keys.transpose(1, 2),  # [D, num_kv_heads, L, head_dim]
        values.transpose(1, 2),
        attn_mask=metadata.decode_mask,  # [D, 1, 1, L]
        scale=scale,
        enable_gqa=True,
    )
    return out.view(num_seqs, num_heads, head_dim)


def prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    span: PrefillSpan,
    scale: float,
) -> torch.Tensor:
    """One sequence's chunk of T new tokens: [T, num_heads, head_dim] -> same shape."""
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    if span.num_context_tokens == 0:
        # Nothing cached before: the new K/V are the whole context, plain causal.
        keys, values, mask = key, value, None
    else:
        keys = key_cache.index_select(0, span.block_ids).view(-1, num_kv_heads, head_dim)
        values = value_cache.index_select(0, span.block_ids).view(-1, num_kv_heads, head_dim)
        keys, values = keys[: span.seq_len], values[: span.seq_len]
        mask = span.mask
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1).unsqueeze(0),  # [1, num_heads, T, head_dim]
        keys.transpose(0, 1).unsqueeze(0),  # [1, num_kv_heads, S, head_dim]
        values.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=True,
    )
    return out.squeeze(0).transpose(0, 1)  # [T, num_heads, head_dim]
