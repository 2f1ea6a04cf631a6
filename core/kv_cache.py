"""The paged KV cache: per layer, K and V blocks of `block_size` tokens each."""
from __future__ import annotations

import torch


class KVCache:
    """K and V tensors per layer, each [num_blocks, block_size, num_kv_heads, head_dim].

    The tensors are allocated uninitialized: on a CPU the pages of a multi-GiB cache then stay
    untouched, outside the process's resident memory, until a step needs them (zero-filling the
    whole cache at start cost seconds and held the full budget resident for a 135M model).
    Uninitialized is not safe to read, though: block 0 is the padding target of block tables, and
    attention gathers the unwritten tail of a sequence's last block and whole blocks of shorter
    sequences. Masked keys get weight 0, but 0 * NaN is NaN in the value matmul. So every block a
    step can read holds finite values: block 0 is zeroed here and `initialize_blocks` zeroes each
    block before the first step that reaches it. Blocks are then only ever overwritten with K/V.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.layers = [(allocate(shape, dtype, device), allocate(shape, dtype, device)) for _ in range(num_layers)]
        self.num_initialized_blocks = 0  # blocks [0, this) hold finite values
        self.initialize_blocks(0)

    def initialize_blocks(self, max_block_id: int) -> None:
        """Zero the blocks up to `max_block_id` that no step has reached yet; called before each step.

        max_block_id: the highest block id the block manager has handed out so far (the step plan's
        `max_block_id`), at least the largest id in the step's block tables. The block manager hands
        out the lowest free ids first, so the zeroed prefix grows with the blocks in use at the
        busiest moment, not with the cache's size.
        """
        start, end = self.num_initialized_blocks, max_block_id + 1
        if end <= start:
            return
        for k_cache, v_cache in self.layers:
            k_cache[start:end].zero_()
            v_cache[start:end].zero_()
        self.num_initialized_blocks = end

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        """Bytes one block takes across all layers, K and V."""
        item = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * item


def allocate(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized cache tensor (a seam: tests fill it with NaN to stand for garbage memory)."""
    return torch.empty(shape, dtype=dtype, device=device)
