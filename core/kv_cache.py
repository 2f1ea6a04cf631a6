"""The paged KV cache: per layer, K and V blocks of `block_size` tokens each."""
from __future__ import annotations

import torch


class KVCache:
    """K and V tensors per layer, each [num_blocks, block_size, num_kv_heads, head_dim].

    Block 0 is never handed to a sequence (the block manager reserves it): padded block-table
    entries point there, so it must hold finite values; zero-filled allocation guarantees that.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.layers = [(torch.zeros(shape, dtype=dtype, device=device),
                        torch.zeros(shape, dtype=dtype, device=device)) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        """Bytes one block takes across all layers, K and V."""
        item = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * item
