"""CUDA graphs of the decode step: one launch instead of ~1,000 small kernels.

A decode step (every sequence adds one token) of a small model on a GPU is bound by
kernel launches, not math. `DecodeGraphs` records the model forward plus the logits
once per (batch bucket, key bucket) and replays it with new inputs copied into static
buffers. Batches are padded up to the bucket with dummy sequences that write their K/V
into a scratch block no sequence owns and attend only to its first slot.

Attention inside a graph is one decode group over `num_keys` keys (the bucket of the
longest context) through the fused SDPA kernel; the sampler stays outside (it has
per-request Python logic) and reads the logits rows of the real sequences.

Everything device-specific is behind `use_cuda_graphs`: with it off, the same static
buffers and padding run eagerly, which is how the CPU tests check this module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from app.model.attention import AttentionGroup, AttentionMetadata

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_GRAPH_KEYS = 256
MAX_GRAPHS = 64  # beyond this many shapes, fall back to eager steps (each graph holds memory)


def batch_bucket(num_seqs: int) -> int:
    return next(b for b in BATCH_BUCKETS if b >= num_seqs)


def graph_num_keys(num_keys: int, block_size: int, max_keys: int) -> int:
    """Keys a graph attends over: multiples of 256 up to 2048, then powers of two."""
    if num_keys <= 2048:
        bucket = -(-max(num_keys, 1) // MIN_GRAPH_KEYS) * MIN_GRAPH_KEYS
    else:
        bucket = 1 << (num_keys - 1).bit_length()
    bucket = min(bucket, max_keys)
    return -(-bucket // block_size) * block_size


class DecodeGraphs:
    """Captured decode steps, keyed by (padded batch, key count)."""

    def __init__(
        self,
        forward: Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor],
        *,
        device: torch.device,
        dtype: torch.dtype,
        num_kv_heads: int,
        block_size: int,
        num_allocated_blocks: int,
        scratch_block: int,
        max_batch: int,
        max_model_len: int,
        use_cuda_graphs: bool,
    ) -> None:
        """forward(input_ids [B], positions [B], metadata) -> logits [B, vocab]."""
        self.forward = forward
        self.device = device
        self.num_kv_heads = num_kv_heads
        self.block_size = block_size
        self.num_allocated_blocks = num_allocated_blocks
        self.scratch_block = scratch_block
        self.max_batch = batch_bucket(min(max_batch, BATCH_BUCKETS[-1]))
        self.max_keys = -(-max_model_len // block_size) * block_size
        self.use_cuda_graphs = use_cuda_graphs
        max_rows = self.max_batch * num_kv_heads * (self.max_keys // block_size)
        # Static inputs: graphs read these addresses on every replay.
        self.input_ids = torch.zeros(self.max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(self.max_batch, dtype=torch.int64, device=device)
        self.slots = torch.zeros(self.max_batch, dtype=torch.int64, device=device)
        self.kv_rows = torch.zeros(max_rows, dtype=torch.int64, device=device)
        self.mask = torch.zeros(self.max_batch * self.max_keys, dtype=dtype, device=device)
        # (batch, num_keys) -> a callable that runs the step and returns its logits
        self.graphs: dict[tuple[int, int], Callable[[], torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if use_cuda_graphs else None

    def supports(self, num_seqs: int, max_context: int) -> bool:
        """Whether a decode step of num_seqs sequences (longest context after this token
        max_context) can run here."""
        if num_seqs > self.max_batch or max_context > self.max_keys:
            return False
        key = (batch_bucket(num_seqs), graph_num_keys(max_context, self.block_size, self.max_keys))
        return key in self.graphs or len(self.graphs) < MAX_GRAPHS

    def run(
        self,
        input_ids: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
    ) -> torch.Tensor:
        """Logits [B, vocab] of one decode step: token input_ids[b] at position
        context_lens[b] of a sequence whose blocks are block_tables[b]."""
        num_seqs = len(input_ids)
        batch = batch_bucket(num_seqs)
        num_keys = graph_num_keys(max(context_lens) + 1, self.block_size, self.max_keys)
        self._fill_inputs(input_ids, context_lens, block_tables, batch, num_keys)
        key = (batch, num_keys)
        if key not in self.graphs:
            self.graphs[key] = self._capture(batch, num_keys)
        return self.graphs[key]()[:num_seqs]

    # --- inputs ------------------------------------------------------------------------

    def _fill_inputs(self, input_ids, context_lens, block_tables, batch: int, num_keys: int):
        """Host-side padding, then one copy per static buffer (no device sync)."""
        num_seqs, block_size = len(input_ids), self.block_size
        num_blocks = num_keys // block_size
        pad = batch - num_seqs
        ids = torch.tensor(list(input_ids) + [0] * pad, dtype=torch.int64)
        positions = torch.tensor(list(context_lens) + [0] * pad, dtype=torch.int64)
        slots = [
            table[pos // block_size] * block_size + pos % block_size
            for table, pos in zip(block_tables, context_lens)
        ] + [self.scratch_block * block_size] * pad
        tables = [
            (list(t[:num_blocks]) + [self.scratch_block] * num_blocks)[:num_blocks]
            for t in block_tables
        ] + [[self.scratch_block] * num_blocks] * pad
        blocks = torch.tensor(tables, dtype=torch.int64)  # [batch, num_blocks]
        offsets = torch.arange(self.num_kv_heads)[None, :, None] * self.num_allocated_blocks
        rows = (blocks[:, None, :] + offsets).flatten()  # (seq, head, block)
        # Real sequences see their context; padding sequences see only key 0.
        visible = torch.tensor(list(context_lens) + [0] * pad)[:, None] + 1
        mask = torch.where(torch.arange(num_keys)[None, :] < visible, 0.0, float("-inf"))
        self.input_ids[:batch].copy_(ids, non_blocking=True)
        self.positions[:batch].copy_(positions, non_blocking=True)
        self.slots[:batch].copy_(torch.tensor(slots, dtype=torch.int64), non_blocking=True)
        self.kv_rows[: rows.numel()].copy_(rows, non_blocking=True)
        self.mask[: batch * num_keys].copy_(mask.flatten(), non_blocking=True)

    def _metadata(self, batch: int, num_keys: int) -> AttentionMetadata:
        """Views of the static buffers shaped for (batch, num_keys)."""
        num_rows = batch * self.num_kv_heads * (num_keys // self.block_size)
        group = AttentionGroup(
            row_start=0,
            row_end=batch,
            num_seqs=batch,
            num_keys=num_keys,
            kv_rows=self.kv_rows[:num_rows],
            mask=self.mask[: batch * num_keys].view(batch, 1, num_keys),
            is_decode=True,
        )
        return AttentionMetadata(
            slot_mapping=self.slots[:batch],
            groups=[group],
            num_decode_tokens=batch,
            backend="sdpa",
        )

    # --- capture -----------------------------------------------------------------------

    def _capture(self, batch: int, num_keys: int) -> Callable[[], torch.Tensor]:
        metadata = self._metadata(batch, num_keys)
        ids, positions = self.input_ids[:batch], self.positions[:batch]

        def step() -> torch.Tensor:
            return self.forward(ids, positions, metadata)

        if not self.use_cuda_graphs:  # the eager twin, for CPU tests
            return step
        # Warm up on a side stream (lazy initialisations must not be captured), then record.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = step()
        logger.info("captured a decode CUDA graph: batch %d, %d keys", batch, num_keys)

        def replay() -> torch.Tensor:
            graph.replay()
            return logits

        return replay
