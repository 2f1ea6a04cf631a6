"""KV-cache block accounting: which blocks are free, how many holders each block has, and what each
full block holds (content hashes, the lookup prefix caching will reuse blocks through). Pure Python."""
from __future__ import annotations

import hashlib
import struct
from collections import Counter
from collections.abc import Sequence as TokenIds

from tgserve.core.invariants import EngineInvariantError
from tgserve.core.sequence import Sequence

ROOT_HASH = b""  # the parent hash of a sequence's first block


def block_hash(parent: bytes, token_ids: TokenIds[int]) -> bytes:
    """Content hash of one full block: SHA-256 of the previous block's hash and this block's token ids.

    Chaining makes equal hashes mean equal whole prefixes, not only equal blocks, so one lookup per
    block finds a cached prefix. SHA-256 rather than Python's `hash`: the hash of a tuple of ints is
    not collision-resistant, and once blocks are reused a crafted prompt that collides with another
    request's prefix would read that request's K/V.
    """
    return hashlib.sha256(parent + struct.pack(f"<{len(token_ids)}q", *token_ids)).digest()


class BlockManager:
    """Reference-counted KV blocks. Block 0 is reserved (padding target), never handed out.

    `allocate` hands out free blocks with one holder each; `share` adds a holder to held blocks (a
    forked sequence, a cached prefix); `free` drops one holder per id and a block returns to the pool
    when its last holder lets go. Misuse (freeing a free block, block 0 or an id outside the pool,
    sharing a free block, allocating more than is free) raises `EngineInvariantError`, which
    `python -O` keeps, and changes nothing.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise EngineInvariantError("need at least one usable block besides the reserved block 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first
        self._ref_counts: list[int] = [0] * num_blocks  # holders per block id; 0 = in the free list
        # Highest id ever handed out: blocks above it were never written (the KV cache zeroes up to it).
        self.max_block_id = 0
        self._hash_of_block: dict[int, bytes] = {}  # held full blocks -> content hash
        self._block_of_hash: dict[bytes, int] = {}  # content hash -> the first held block with it

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
        """Take `num_blocks` free blocks, one holder each; the caller checked `can_allocate`."""
        if not self.can_allocate(num_blocks):
            raise EngineInvariantError(f"asked {num_blocks} blocks, {len(self._free)} free")
        taken = [self._free.pop() for _ in range(num_blocks)]
        for block_id in taken:
            self._ref_counts[block_id] = 1
        if taken:
            self.max_block_id = max(self.max_block_id, max(taken))
        return taken

    def share(self, block_ids: list[int]) -> None:
        """Add one holder to each of `block_ids`, all held already (a fork, a reused cached prefix)."""
        self._check_ids(block_ids)
        if any(self._ref_counts[b] == 0 for b in block_ids):
            raise EngineInvariantError("sharing a free block")
        for block_id in block_ids:
            self._ref_counts[block_id] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one holder of each of `block_ids`; blocks left without holders return to the pool."""
        self._check_ids(block_ids)
        counts = self._ref_counts
        if any(counts[b] < n for b, n in Counter(block_ids).items()):
            raise EngineInvariantError("a block was freed twice")
        released = []
        for block_id in block_ids:
            counts[block_id] -= 1
            if counts[block_id] == 0:
                released.append(block_id)
                self._forget_hash(block_id)
        self._free.extend(reversed(released))

    def ref_count(self, block_id: int) -> int:
        """Holders of `block_id`; 0 when it is free."""
        return self._ref_counts[block_id]

    def _check_ids(self, block_ids: list[int]) -> None:
        if not all(0 < b < self.num_blocks for b in block_ids):
            raise EngineInvariantError(f"block id outside 1..{self.num_blocks - 1}")

    # --- content hashes (prefix caching) -------------------------------------------------------

    def hash_full_blocks(self, seq: Sequence) -> None:
        """Hash the blocks of `seq` that its computed tokens filled since the last call, appending to
        `seq.block_hashes`, and record each as `hash -> block id`. Called whenever computed tokens are
        accepted (`Scheduler.advance`); O(1) unless a block filled up."""
        hashes, size = seq.block_hashes, self.block_size
        num_full = seq.num_computed_tokens // size
        parent = hashes[-1] if hashes else ROOT_HASH
        for i in range(len(hashes), num_full):
            parent = block_hash(parent, seq.token_ids[i * size:(i + 1) * size])
            hashes.append(parent)
            block_id = seq.block_ids[i]
            self._hash_of_block[block_id] = parent
            self._block_of_hash.setdefault(parent, block_id)

    def cached_block(self, content_hash: bytes) -> int | None:
        """The held block whose tokens (and whole prefix) hash to `content_hash`, or None.

        A block leaves this lookup when its last holder frees it (prefix caching, issue 16, will keep
        unreferenced blocks findable until they are reallocated)."""
        return self._block_of_hash.get(content_hash)

    def num_computed_prompt_tokens(self, token_ids: TokenIds[int]) -> int:
        """Prompt tokens of a waiting sequence whose K/V the cache already holds, asked at admission.

        The answer is a multiple of `block_size` and less than `len(token_ids)` (the last prompt token
        is always computed: the first token is sampled from its logits). Always 0 until prefix caching
        (issue 16) shares cached blocks at admission."""
        return 0

    def _forget_hash(self, block_id: int) -> None:
        content_hash = self._hash_of_block.pop(block_id, None)
        if content_hash is not None and self._block_of_hash.get(content_hash) == block_id:
            del self._block_of_hash[content_hash]
