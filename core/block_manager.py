"""KV-cache block accounting and prefix caching: which blocks are free, how many holders each block has,
and which full blocks hold what (content hashes), so a new request reuses the K/V of a prefix another
request computed. Pure Python.

Prefix caching (on unless `is_prefix_caching=False`): every block full of computed tokens is keyed by
`block_hash` of its tokens and everything before it. A block whose last holder lets go keeps its
content and stays findable in an LRU pool of cached free blocks; `allocate` takes never-cached free
blocks first and then evicts the least recently freed cached ones. At admission `cached_prefix` finds
the longest chain of cached blocks of a prompt and `reuse` takes holders of them (pulling unreferenced
ones out of the pool), so admission counts a shared block once. A block is only ever written by the
one sequence that allocated it, at positions past its cached prefix, and only hashed once full: a
block that is found through its hash is never written again while it lives.
"""
from __future__ import annotations

import hashlib
import struct
from collections import Counter, OrderedDict
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
    """Reference-counted KV blocks with a prefix cache. Block 0 is reserved (padding target), never handed out.

    `allocate` hands out free blocks with one holder each; `share` adds a holder to held blocks (a
    forked sequence); `reuse` takes a holder of cached blocks, held or not; `free` drops one holder
    per id, and a block left without holders returns to the free pool, keeping its content findable
    when it is a cached block. Misuse (freeing a free block, block 0 or an id outside the pool,
    sharing a free block, allocating more than is free) raises `EngineInvariantError`, which
    `python -O` keeps, and changes nothing.
    """

    def __init__(self, num_blocks: int, block_size: int, is_prefix_caching: bool = True):
        if num_blocks < 2:
            raise EngineInvariantError("need at least one usable block besides the reserved block 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.is_prefix_caching = is_prefix_caching
        self._free: list[int] = list(range(num_blocks - 1, 0, -1))  # never-cached free blocks; pop() gives low ids first
        # Free blocks whose content is still findable by its hash, least recently freed first.
        self._cached_free: OrderedDict[int, None] = OrderedDict()
        self._ref_counts: list[int] = [0] * num_blocks  # holders per block id; 0 = free
        # Highest id ever handed out: blocks above it were never written (the KV cache zeroes up to it).
        self.max_block_id = 0
        self._hash_of_block: dict[int, bytes] = {}  # full blocks (held, or free and cached) -> content hash
        self._block_of_hash: dict[bytes, int] = {}  # content hash -> the block found through it

    @property
    def num_free_blocks(self) -> int:
        """Blocks `allocate` can hand out: never-cached free ones and cached ones it would evict."""
        return len(self._free) + len(self._cached_free)

    @property
    def num_cached_free_blocks(self) -> int:
        """Free blocks whose content a new request may still reuse."""
        return len(self._cached_free)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int, reusing: TokenIds[int] = ()) -> bool:
        """Whether `num_blocks` new blocks fit after `reuse(reusing)` took its free cached blocks."""
        num_taken = sum(1 for block_id in reusing if self._ref_counts[block_id] == 0)
        return num_blocks <= self.num_free_blocks - num_taken

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` free blocks, one holder each: never-cached ones first, then the least
        recently freed cached ones, whose content is forgotten. The caller checked `can_allocate`."""
        if not self.can_allocate(num_blocks):
            raise EngineInvariantError(f"asked {num_blocks} blocks, {self.num_free_blocks} free")
        num_plain = min(num_blocks, len(self._free))
        taken = [self._free.pop() for _ in range(num_plain)]
        for _ in range(num_blocks - num_plain):
            block_id, _ = self._cached_free.popitem(last=False)
            self._forget_hash(block_id)
            taken.append(block_id)
        for block_id in taken:
            self._ref_counts[block_id] = 1
        if taken:
            self.max_block_id = max(self.max_block_id, max(taken))
        return taken

    def reuse(self, block_ids: list[int]) -> list[int]:
        """Take one holder of each cached block of `block_ids` (from `cached_prefix`), pulling
        unreferenced ones out of the cached free pool; returns `block_ids`."""
        self._check_ids(block_ids)
        for block_id in block_ids:
            if block_id not in self._hash_of_block:
                raise EngineInvariantError(f"reusing block {block_id}, which holds no cached content")
            if self._ref_counts[block_id] == 0:
                del self._cached_free[block_id]
            self._ref_counts[block_id] += 1
        return block_ids

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
        # A sequence's last blocks go to the cached pool first, so they are evicted before its first
        # ones: a prefix stays reusable as long as possible, and a chain is never left with a hole.
        plain = []
        for block_id in reversed(released):
            if self.is_prefix_caching and self._is_findable(block_id):
                self._cached_free[block_id] = None
            else:
                self._forget_hash(block_id)
                plain.append(block_id)
        self._free.extend(plain)

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
        """The block (held, or free and cached) whose tokens and whole prefix hash to `content_hash`, or None.
        Without prefix caching a block leaves this lookup when its last holder frees it."""
        return self._block_of_hash.get(content_hash)

    def cached_prefix(self, token_ids: TokenIds[int]) -> tuple[list[int], list[bytes]]:
        """The cached blocks holding the longest prefix of `token_ids`, and their hashes, asked at admission.

        At most `(len(token_ids) - 1) // block_size` blocks: the last prompt token is always computed
        (the first generated token is sampled from its logits). ([], []) without prefix caching."""
        if not self.is_prefix_caching:
            return [], []
        size = self.block_size
        block_ids, hashes, parent = [], [], ROOT_HASH
        for i in range((len(token_ids) - 1) // size):
            parent = block_hash(parent, token_ids[i * size:(i + 1) * size])
            block_id = self._block_of_hash.get(parent)
            if block_id is None:
                break
            block_ids.append(block_id)
            hashes.append(parent)
        return block_ids, hashes

    def clear_cache(self) -> None:
        """Forget every free cached block (they become plain free blocks); held blocks keep their hashes.
        TGI's ClearCache for the prefix cache: the next requests compute their prompts whole."""
        for block_id in self._cached_free:
            self._forget_hash(block_id)
        self._free.extend(reversed(self._cached_free))
        self._cached_free.clear()

    def check_invariants(self) -> None:
        """Raise `EngineInvariantError` unless every usable block is in exactly one state: held (holders
        > 0), free and never cached, or free and cached (findable by its own hash); and the hash maps
        agree. O(blocks): for tests and checks, not for every step."""
        free, cached_free = set(self._free), set(self._cached_free)
        if len(free) != len(self._free) or free & cached_free or 0 in free | cached_free:
            raise EngineInvariantError("a block is twice in the free pools, or block 0 is free")
        for block_id in range(1, self.num_blocks):
            count = self._ref_counts[block_id]
            states = (count > 0) + (block_id in free) + (block_id in cached_free)
            if count < 0 or states != 1:
                raise EngineInvariantError(f"block {block_id}: {count} holders, in free pool "
                                           f"{block_id in free}, in cached pool {block_id in cached_free}")
            if block_id in free and block_id in self._hash_of_block:
                raise EngineInvariantError(f"free block {block_id} still has a content hash")
            if block_id in cached_free and not self._is_findable(block_id):
                raise EngineInvariantError(f"cached free block {block_id} cannot be found by its hash")
        for content_hash, block_id in self._block_of_hash.items():
            if self._hash_of_block.get(block_id) != content_hash:
                raise EngineInvariantError(f"hash lookup names block {block_id}, which holds other content")

    def _is_findable(self, block_id: int) -> bool:
        content_hash = self._hash_of_block.get(block_id)
        return content_hash is not None and self._block_of_hash.get(content_hash) == block_id

    def _forget_hash(self, block_id: int) -> None:
        content_hash = self._hash_of_block.pop(block_id, None)
        if content_hash is not None and self._block_of_hash.get(content_hash) == block_id:
            del self._block_of_hash[content_hash]
