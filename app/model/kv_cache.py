"""The paged KV cache: preallocated fixed-size blocks of keys and values for every layer.

A sequence's context lives in the blocks its block table lists, in order: token at
position p sits in block `block_table[p // block_size]`, row `p % block_size`.
Blocks are reserved once at start-up, so serving never allocates cache memory. On the
CPU the reservation is an anonymous mapping the kernel fills with zero pages as they are
first written: a block costs memory from the first time a sequence uses it, and the
block manager hands out low block ids first, so resident memory follows the most blocks
ever in use at once (plus the prefix cache's), not the reserved size.
"""

from __future__ import annotations

import torch

from app.model.config import ModelConfig
from app.model.host_memory import lazy_zeros, resident_bytes

GIB = 1024**3


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Memory of one block across all layers, keys and values."""
    element_bytes = torch.empty((), dtype=dtype).element_size()
    return (
        2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * element_bytes
    )


def num_blocks_for_bytes(
    config: ModelConfig, block_size: int, dtype: torch.dtype, budget_bytes: float
) -> int:
    return int(budget_bytes // bytes_per_block(config, block_size, dtype))


class KVCache:
    """Keys and values of every layer, each [num_kv_heads, num_blocks, block_size, head_dim].

    Head-major, so one head's blocks of one sequence gather into a contiguous matrix.
    One scratch block follows the `num_blocks` the scheduler hands out: padding rows of
    a CUDA graph write their junk there.
    """

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks  # usable by sequences
        self.scratch_block = num_blocks  # owned by nobody
        self.num_allocated_blocks = num_blocks + 1
        self.block_size = block_size
        shape = (
            config.num_layers,
            2,
            config.num_kv_heads,
            self.num_allocated_blocks,
            block_size,
            config.head_dim,
        )
        # One allocation for everything; layers are views into it. Zeroed, not left empty:
        # a gathered but masked-out row must never hold NaN (0 * NaN = NaN). On the CPU
        # the zeros come from the kernel, page by page as blocks are first written; with
        # 4 KiB pages, not huge ones: a block of one layer's head is a few KiB, and 2 MiB
        # pages would make its first use cost 2 MiB in each of the layers' heads.
        if device.type == "cpu":
            self._storage = lazy_zeros(shape, dtype)
        else:
            self._storage = torch.zeros(shape, device=device, dtype=dtype)
        self.layers = list(self._storage.unbind(0))  # [2, kv_heads, num_blocks, block, dim]

    @property
    def num_bytes(self) -> int:
        return self._storage.numel() * self._storage.element_size()

    @property
    def num_resident_bytes(self) -> int | None:
        """Bytes of the cache backed by memory now (CPU; None where unknown): the pages
        sequences have written so far."""
        return resident_bytes(self._storage)

    def layer(self, index: int) -> torch.Tensor:
        """Keys ([0]) and values ([1]) of one layer: [2, kv_heads, num_blocks, block_size, dim]."""
        return self.layers[index]


def write_kv(layer_cache: torch.Tensor, new_kv: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' keys and values at their slots (block * block_size + offset).

    layer_cache [2, kv_heads, num_blocks, block_size, dim]; new_kv [num_tokens, 2 * kv_heads,
    dim], keys then values: both land with one copy.
    """
    two, num_kv_heads, num_blocks, block_size, head_dim = layer_cache.shape
    slots = layer_cache.view(two * num_kv_heads, num_blocks * block_size, head_dim)
    slots.index_copy_(1, slot_mapping, new_kv.transpose(0, 1))
