"""The paged KV cache: preallocated fixed-size blocks of keys and values for every layer.

A sequence's context lives in the blocks its block table lists, in order: token at
position p sits in block `block_table[p // block_size]`, row `p % block_size`.
Blocks are allocated once at start-up, so serving never allocates cache memory.
"""

from __future__ import annotations

import torch

from app.model.host_memory import advise_huge_pages
from app.model.loader import ModelConfig

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
        # One allocation for everything; layers are views into it. Huge pages before the
        # first touch: decode gathers scattered blocks, which 4 KiB pages make TLB-bound.
        self._storage = torch.empty(shape, device=device, dtype=dtype)
        self.uses_huge_pages = advise_huge_pages(self._storage)
        # Zeroed, not left empty: a gathered but masked-out row must never hold NaN
        # (0 * NaN = NaN).
        self._storage.zero_()
        self.layers = list(self._storage.unbind(0))  # [2, kv_heads, num_blocks, block, dim]

    @property
    def num_bytes(self) -> int:
        return self._storage.numel() * self._storage.element_size()

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
