"""BlockManager: the reserved block 0, allocate/free round trips, capacity checks, double frees,
reference counts of shared blocks, chained content hashes of full blocks."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tgserve.core.block_manager import ROOT_HASH, BlockManager, block_hash
from tgserve.core.invariants import EngineInvariantError
from tgserve.core.request import GenerationRequest, SamplingParams, StoppingParams
from tgserve.core.sequence import Sequence


def test_block_zero_is_never_handed_out():
    blocks = BlockManager(num_blocks=5, block_size=4)
    assert blocks.num_usable_blocks == 4
    assert blocks.num_free_blocks == 4
    taken = blocks.allocate(4)
    assert sorted(taken) == [1, 2, 3, 4]
    assert not blocks.can_allocate(1)


def test_low_ids_first_and_no_block_twice():
    blocks = BlockManager(num_blocks=9, block_size=16)
    first = blocks.allocate(3)
    second = blocks.allocate(2)
    assert first == [1, 2, 3]
    assert second == [4, 5]
    assert not set(first) & set(second)


def test_allocate_free_round_trip_restores_pool():
    blocks = BlockManager(num_blocks=11, block_size=8)
    held = [blocks.allocate(n) for n in (3, 1, 4)]
    assert blocks.num_free_blocks == 10 - 8
    blocks.free(held[1])
    assert blocks.num_free_blocks == 3
    blocks.free(held[0])
    blocks.free(held[2])
    assert blocks.num_free_blocks == 10
    assert sorted(blocks.allocate(10)) == list(range(1, 11))


def test_freed_blocks_are_reused():
    blocks = BlockManager(num_blocks=4, block_size=8)
    a = blocks.allocate(3)
    blocks.free(a[1:2])
    assert blocks.allocate(1) == [a[1]]


def test_can_allocate_limits():
    blocks = BlockManager(num_blocks=6, block_size=4)
    assert blocks.can_allocate(0)
    assert blocks.can_allocate(5)
    assert not blocks.can_allocate(6)
    blocks.allocate(2)
    assert blocks.can_allocate(3)
    assert not blocks.can_allocate(4)
    with pytest.raises(EngineInvariantError, match="asked 4 blocks, 3 free"):
        blocks.allocate(4)
    assert blocks.num_free_blocks == 3  # a refused allocation takes nothing


@pytest.mark.parametrize(("num_tokens", "num_blocks"), [(0, 0), (1, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_blocks_for_rounds_up(num_tokens, num_blocks):
    assert BlockManager(num_blocks=3, block_size=4).blocks_for(num_tokens) == num_blocks


def test_needs_a_usable_block():
    with pytest.raises(EngineInvariantError, match="at least one usable block"):
        BlockManager(num_blocks=1, block_size=4)


def test_double_free_of_whole_pool_is_caught():
    blocks = BlockManager(num_blocks=4, block_size=4)
    taken = blocks.allocate(3)
    blocks.free(taken)
    with pytest.raises(EngineInvariantError, match="freed twice"):
        blocks.free(taken[:1])


def test_double_free_while_other_blocks_are_held_is_caught():
    # Freeing block A twice while block B is still held keeps the free count within bounds,
    # but A would then be handed out to two sequences at once.
    blocks = BlockManager(num_blocks=4, block_size=4)
    a, _still_held = blocks.allocate(2)
    blocks.free([a])
    with pytest.raises(EngineInvariantError, match="freed twice"):
        blocks.free([a])


def test_freeing_reserved_block_zero_is_caught():
    blocks = BlockManager(num_blocks=4, block_size=4)
    blocks.allocate(1)
    with pytest.raises(EngineInvariantError, match="outside 1..3"):
        blocks.free([0])


@pytest.mark.parametrize("block_id", [4, 5, -1])
def test_freeing_an_id_outside_the_pool_is_caught(block_id):
    blocks = BlockManager(num_blocks=4, block_size=4)
    blocks.allocate(3)
    with pytest.raises(EngineInvariantError, match="outside 1..3"):
        blocks.free([block_id])
    assert blocks.num_free_blocks == 0  # a refused free returns nothing


def test_double_free_is_caught_under_python_dash_o():
    # `python -O` strips `assert`; the invariant must not go with it. The script checks that -O is
    # really in effect (an `assert False` passes) before the double free.
    script = textwrap.dedent("""
        import sys
        from tgserve.core.block_manager import BlockManager
        from tgserve.core.invariants import EngineInvariantError
        assert False, "asserts are still on"
        blocks = BlockManager(num_blocks=4, block_size=4)
        taken = blocks.allocate(1)
        blocks.free(taken)
        try:
            blocks.free(taken)
        except EngineInvariantError as error:
            print(f"optimize={sys.flags.optimize} raised: {error}")
        else:
            print(f"optimize={sys.flags.optimize} not raised")
    """)
    done = subprocess.run([sys.executable, "-O", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "optimize=1 raised: a block was freed twice"


# --- reference counts --------------------------------------------------------------------------------


def test_a_block_shared_by_two_sequences_returns_to_the_pool_when_both_freed_it():
    blocks = BlockManager(num_blocks=5, block_size=4)
    first = blocks.allocate(2)  # sequence A
    shared = first[0]
    blocks.share([shared])  # sequence B holds A's first block too
    second = [shared] + blocks.allocate(1)
    assert blocks.ref_count(shared) == 2 and blocks.num_free_blocks == 1
    blocks.free(first)  # A finishes: B still holds the shared block
    assert blocks.ref_count(shared) == 1 and blocks.ref_count(first[1]) == 0
    assert blocks.num_free_blocks == 2
    assert shared not in blocks.allocate(2)  # a held block is never handed out again
    blocks.free(second)  # B finishes: its last holder let go
    assert blocks.ref_count(shared) == 0 and blocks.num_free_blocks == 2
    with pytest.raises(EngineInvariantError, match="freed twice"):
        blocks.free([shared])


def test_freeing_one_block_more_often_than_it_is_held_is_caught_and_changes_nothing():
    blocks = BlockManager(num_blocks=4, block_size=4)
    a, b = blocks.allocate(2)
    blocks.share([a])
    with pytest.raises(EngineInvariantError, match="freed twice"):
        blocks.free([b, a, a, a])
    assert (blocks.ref_count(a), blocks.ref_count(b), blocks.num_free_blocks) == (2, 1, 1)
    blocks.free([a, a])
    assert blocks.ref_count(a) == 0 and blocks.num_free_blocks == 2


def test_sharing_a_free_block_is_caught():
    blocks = BlockManager(num_blocks=4, block_size=4)
    held = blocks.allocate(1)
    with pytest.raises(EngineInvariantError, match="sharing a free block"):
        blocks.share(held + [3])
    assert blocks.ref_count(held[0]) == 1  # a refused share adds nothing
    with pytest.raises(EngineInvariantError, match="outside 1..3"):
        blocks.share([0])


def test_max_block_id_is_the_highest_id_ever_handed_out():
    blocks = BlockManager(num_blocks=8, block_size=4)
    assert blocks.max_block_id == 0
    taken = blocks.allocate(3)
    assert blocks.max_block_id == 3
    blocks.free(taken)
    assert blocks.max_block_id == 3  # freed blocks were written: still counted
    blocks.allocate(2)
    assert blocks.max_block_id == 3
    blocks.allocate(2)
    assert blocks.max_block_id == 4


# --- content hashes ----------------------------------------------------------------------------------


def _computed_seq(blocks: BlockManager, token_ids: list[int], num_computed: int) -> Sequence:
    """A running sequence holding blocks for its tokens, `num_computed` of them computed and hashed."""
    request = GenerationRequest(list(token_ids), SamplingParams(), StoppingParams(1))
    seq = Sequence(0, request, list(token_ids), len(token_ids), len(token_ids) + 1)
    seq.block_ids = blocks.allocate(blocks.blocks_for(seq.max_tokens))
    seq.num_computed_tokens = num_computed
    blocks.hash_full_blocks(seq)
    return seq


def test_full_blocks_hash_their_whole_prefix():
    blocks = BlockManager(num_blocks=32, block_size=4)
    a = _computed_seq(blocks, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 10)
    b = _computed_seq(blocks, [1, 2, 3, 4, 5, 6, 7, 8, 42], 9)
    c = _computed_seq(blocks, [9, 2, 3, 4, 5, 6, 7, 8], 8)  # differs only in the first block
    assert len(a.block_hashes) == 2  # the third block holds 2 of 4 tokens: not hashed
    assert b.block_hashes == a.block_hashes  # same prefix, same hashes
    assert c.block_hashes[0] != a.block_hashes[0]
    assert c.block_hashes[1] != a.block_hashes[1]  # same tokens, different earlier block
    assert len(set(a.block_hashes)) == 2  # and the blocks of one sequence differ from each other
    assert a.block_hashes[0] == block_hash(ROOT_HASH, [1, 2, 3, 4])
    assert block_hash(ROOT_HASH, [1, 2, 3, 4]) != block_hash(ROOT_HASH, [1, 2, 3, 5])


def test_only_computed_tokens_fill_a_block():
    blocks = BlockManager(num_blocks=32, block_size=4)
    seq = _computed_seq(blocks, list(range(1, 10)), 3)
    assert seq.block_hashes == []
    seq.num_computed_tokens = 8
    blocks.hash_full_blocks(seq)
    assert len(seq.block_hashes) == 2
    hashes = list(seq.block_hashes)
    blocks.hash_full_blocks(seq)  # nothing new computed: nothing rehashed or appended
    assert seq.block_hashes == hashes


def test_without_prefix_caching_the_lookup_forgets_a_block_when_freed():
    blocks = BlockManager(num_blocks=32, block_size=4, is_prefix_caching=False)
    a = _computed_seq(blocks, list(range(1, 9)), 8)
    b = _computed_seq(blocks, list(range(1, 9)), 8)  # computed again, into its own blocks
    assert b.block_hashes == a.block_hashes
    assert [blocks.cached_block(h) for h in a.block_hashes] == a.block_ids[:2]
    assert blocks.cached_block(block_hash(ROOT_HASH, [8, 7, 6, 5])) is None
    blocks.share(a.block_ids[:1])
    blocks.free(a.block_ids)  # the first block still has a holder, the second has none
    assert blocks.cached_block(a.block_hashes[0]) == a.block_ids[0]
    assert blocks.cached_block(a.block_hashes[1]) is None
    assert blocks.cached_prefix(list(range(1, 13))) == ([], [])
    assert blocks.num_cached_free_blocks == 0
    blocks.check_invariants()


# --- prefix caching ----------------------------------------------------------------------------------


def test_freed_full_blocks_stay_findable_and_a_prompt_finds_its_longest_cached_prefix():
    blocks = BlockManager(num_blocks=32, block_size=4)
    a = _computed_seq(blocks, list(range(1, 11)), 10)  # two full blocks, a third holding 2 tokens
    blocks.free(a.block_ids)
    assert blocks.num_cached_free_blocks == 2 and blocks.num_free_blocks == 31
    assert blocks.cached_prefix(list(range(1, 11)) + [99]) == (a.block_ids[:2], a.block_hashes)
    assert blocks.cached_prefix([1, 2, 3, 4, 5, 6, 0, 8, 9]) == (a.block_ids[:1], a.block_hashes[:1])
    assert blocks.cached_prefix([0, 2, 3, 4, 5, 6, 7, 8, 9]) == ([], [])
    # The last prompt token is always computed: a prompt of exactly two cached blocks reuses one.
    assert blocks.cached_prefix(list(range(1, 9))) == (a.block_ids[:1], a.block_hashes[:1])
    blocks.check_invariants()


def test_reuse_takes_holders_and_admission_counts_shared_blocks_once():
    blocks = BlockManager(num_blocks=6, block_size=4)  # 5 usable
    a = _computed_seq(blocks, list(range(1, 9)), 8)  # 3 blocks (8 tokens + 1)
    cached, _ = blocks.cached_prefix(list(range(1, 9)) + [50])
    assert cached == a.block_ids[:2]
    assert blocks.can_allocate(2, reusing=cached)  # held blocks cost nothing: 2 free
    assert not blocks.can_allocate(3, reusing=cached)
    blocks.free(a.block_ids)  # now the two cached blocks are free, and taking them uses up free blocks
    assert blocks.num_free_blocks == 5
    assert blocks.can_allocate(3, reusing=cached) and not blocks.can_allocate(4, reusing=cached)
    assert blocks.reuse(cached) == cached
    assert [blocks.ref_count(b) for b in cached] == [1, 1] and blocks.num_cached_free_blocks == 0
    assert blocks.num_free_blocks == 3
    blocks.reuse(cached)  # a second request on the same prefix
    assert [blocks.ref_count(b) for b in cached] == [2, 2]
    blocks.check_invariants()
    with pytest.raises(EngineInvariantError):
        blocks.reuse([a.block_ids[2]])  # never full: no cached content


def test_allocation_takes_never_cached_blocks_first_then_evicts_the_least_recently_freed():
    blocks = BlockManager(num_blocks=8, block_size=2)  # 7 usable
    old = _computed_seq(blocks, [1, 2, 3, 4], 4)  # 3 blocks, 2 full
    new = _computed_seq(blocks, [5, 6, 7, 8], 4)
    blocks.free(old.block_ids)
    blocks.free(new.block_ids)
    assert blocks.num_cached_free_blocks == 4 and blocks.num_free_blocks == 7
    blocks.allocate(3)  # the never-cached free blocks: every cached prefix is still findable
    assert blocks.cached_prefix([1, 2, 3, 4, 0])[0] == old.block_ids[:2]
    blocks.allocate(1)  # evicts the least recently freed: the last block of the older sequence
    assert blocks.cached_prefix([1, 2, 3, 4, 0])[0] == old.block_ids[:1]
    assert blocks.cached_prefix([5, 6, 7, 8, 0])[0] == new.block_ids[:2]
    blocks.allocate(1)
    assert blocks.cached_prefix([1, 2, 3, 4, 0]) == ([], [])
    blocks.check_invariants()


def test_a_duplicate_block_is_freed_plainly_and_the_first_stays_the_cached_one():
    blocks = BlockManager(num_blocks=32, block_size=4)
    a = _computed_seq(blocks, list(range(1, 9)), 8)
    b = _computed_seq(blocks, list(range(1, 9)), 8)  # admitted before `a` was computed: its own copy
    blocks.free(b.block_ids)
    assert blocks.num_cached_free_blocks == 0  # `a`'s blocks are the findable ones
    blocks.free(a.block_ids)
    assert blocks.num_cached_free_blocks == 2
    assert blocks.cached_prefix(list(range(1, 10)))[0] == a.block_ids[:2]
    blocks.check_invariants()


def test_clearing_the_cache_forgets_free_blocks_and_keeps_held_ones():
    blocks = BlockManager(num_blocks=32, block_size=4)
    a = _computed_seq(blocks, list(range(1, 9)), 8)
    b = _computed_seq(blocks, list(range(11, 19)), 8)
    blocks.free(a.block_ids)
    blocks.clear_cache()
    assert blocks.num_cached_free_blocks == 0 and blocks.num_free_blocks == 31 - 3
    assert blocks.cached_prefix(list(range(1, 10))) == ([], [])
    assert blocks.cached_prefix(list(range(11, 20)))[0] == b.block_ids[:2]
    blocks.check_invariants()
