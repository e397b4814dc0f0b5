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
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (config.num_layers, 2, config.num_kv_heads, num_blocks, block_size, config.head_dim)
        # One allocation for everything; layers are views into it. Huge pages before the
        # first touch: decode gathers scattered blocks, which 4 KiB pages make TLB-bound.
        self._storage = torch.empty(shape, device=device, dtype=dtype)
        self.uses_huge_pages = advise_huge_pages(self._storage)
        # Zeroed, not left empty: a gathered but masked-out row must never hold NaN
        # (0 * NaN = NaN).
        self._storage.zero_()
        self.key_caches = [self._storage[layer, 0] for layer in range(config.num_layers)]
        self.value_caches = [self._storage[layer, 1] for layer in range(config.num_layers)]

    @property
    def num_bytes(self) -> int:
        return self._storage.numel() * self._storage.element_size()

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(key_cache, value_cache) of one layer, each [kv_heads, num_blocks, block_size, dim]."""
        return self.key_caches[index], self.value_caches[index]


def write_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store the new tokens' K/V ([num_tokens, num_kv_heads, head_dim]) at their slots.

    slot = block * block_size + offset; the caches are [num_kv_heads, num_blocks, block_size, dim].
    """
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    key_cache.view(num_kv_heads, -1, head_dim).index_copy_(1, slot_mapping, key.transpose(0, 1))
    value_cache.view(num_kv_heads, -1, head_dim).index_copy_(1, slot_mapping, value.transpose(0, 1))
