"""BlockManager: the reserved block 0, allocate/free round trips, capacity checks, double frees."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tgserve.core.block_manager import BlockManager
from tgserve.core.invariants import EngineInvariantError


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
