"""KV-cache block accounting: which blocks are free, and which a sequence holds. Pure Python."""
from __future__ import annotations

from tgserve.core.invariants import EngineInvariantError


class BlockManager:
    """A free list of block ids. Block 0 is reserved (padding target), never handed out.

    Misuse (a double free, freeing block 0 or an id outside the pool, allocating more than is free)
    raises `EngineInvariantError`, which `python -O` keeps."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise EngineInvariantError("need at least one usable block besides the reserved block 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first
        self._free_set: set[int] = set(self._free)  # the same ids, to catch double frees

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` free blocks; the caller checked `can_allocate`."""
        if not self.can_allocate(num_blocks):
            raise EngineInvariantError(f"asked {num_blocks} blocks, {len(self._free)} free")
        taken = [self._free.pop() for _ in range(num_blocks)]
        self._free_set.difference_update(taken)
        return taken

    def free(self, block_ids: list[int]) -> None:
        """Return blocks to the pool."""
        if not all(0 < b < self.num_blocks for b in block_ids):
            raise EngineInvariantError(f"freeing a block outside 1..{self.num_blocks - 1}")
        if self._free_set.intersection(block_ids):
            raise EngineInvariantError("a block was freed twice")
        self._free.extend(reversed(block_ids))
        self._free_set.update(block_ids)
