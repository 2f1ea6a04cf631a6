"""Scheduler: continuous batching, FIFO admission, step token budget, chunking, block reservation,
the block manager's already-computed answer at admission, content hashes of filled blocks.

Sequences are built directly; `_step` mirrors what `Engine._update` / `_append` do after a step.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tgserve.core.block_manager import ROOT_HASH, BlockManager, block_hash
from tgserve.core.invariants import EngineInvariantError
from tgserve.core.request import GenerationRequest, SamplingParams, StoppingParams
from tgserve.core.scheduler import Scheduler
from tgserve.core.sequence import Sequence, SequenceStatus

_NEXT_TOKEN = 7


def _seq(request_id: int, num_prompt_tokens: int, max_new_tokens: int, variant: int = 0) -> Sequence:
    """A request of the shared prompt 1, 2, ... 50, 1, ... (`variant` n > 0: its token 3 is 100 + n)."""
    prompt = [1 + i % 50 if i != 3 or not variant else 100 + variant for i in range(num_prompt_tokens)]
    request = GenerationRequest(prompt, SamplingParams(), StoppingParams(max_new_tokens), request_id=request_id)
    return Sequence(request_id, request, list(prompt), num_prompt_tokens, num_prompt_tokens + max_new_tokens)


def _scheduler(num_blocks=64, block_size=4, max_step_tokens=64, max_batch_size=None, chunking=True) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), max_step_tokens, max_batch_size, chunking)


def _step(scheduler: Scheduler):
    """One engine step: schedule, then `_compute` the plan."""
    plan = scheduler.schedule()
    _compute(scheduler, plan)
    return plan


def _compute(scheduler: Scheduler, plan) -> None:
    """'Compute' a plan: append a token to sampling rows, finish them at max_new_tokens."""
    for item in plan.scheduled:
        seq = item.seq
        scheduler.advance(seq, item.num_new_tokens)
        if item.is_sampling:
            seq.token_ids.append(_NEXT_TOKEN)
            if seq.num_generated_tokens >= seq.request.stopping.max_new_tokens:
                scheduler.finish(seq)


def _tokens(plan) -> dict[int, int]:
    return {item.seq.request_id: item.num_new_tokens for item in plan.scheduled}


def test_request_joins_running_batch_at_next_step():
    scheduler = _scheduler()
    a = _seq(0, 5, 10)
    scheduler.add(a)
    assert _tokens(_step(scheduler)) == {0: 5}
    assert _tokens(_step(scheduler)) == {0: 1}
    b = _seq(1, 3, 10)
    scheduler.add(b)
    assert b.status is SequenceStatus.WAITING and b.block_ids == []
    plan = _step(scheduler)
    assert _tokens(plan) == {0: 1, 1: 3}
    assert [item.seq for item in plan.scheduled] == [a, b]  # running first, then admissions
    assert all(item.is_sampling for item in plan.scheduled)
    assert b.status is SequenceStatus.RUNNING and scheduler.running == [a, b]
    assert _tokens(_step(scheduler)) == {0: 1, 1: 1}


def test_one_token_rows_come_first_in_the_plan():
    """A one-token prompt admitted behind a chunked prompt is listed before it (attention splits there)."""
    scheduler = _scheduler(max_step_tokens=6)
    a, b, c = _seq(0, 2, 8), _seq(1, 8, 8), _seq(2, 1, 8)
    scheduler.add(a)
    assert _tokens(_step(scheduler)) == {0: 2}
    scheduler.add(b)
    assert _tokens(_step(scheduler)) == {0: 1, 1: 5}
    scheduler.add(c)
    plan = _step(scheduler)
    assert [(item.seq.request_id, item.num_new_tokens) for item in plan.scheduled] == [(0, 1), (2, 1), (1, 3)]
    assert scheduler.running == [a, b, c]  # admission order is unchanged


def test_empty_scheduler_plans_nothing():
    scheduler = _scheduler()
    assert not scheduler.has_work
    plan = scheduler.schedule()
    assert not plan and plan.num_tokens == 0


def test_later_small_request_never_overtakes_earlier_big_one():
    # 8 usable blocks of 4 tokens. A holds 6 blocks; B needs 4 (does not fit: its prompt shares no block
    # with A's), C needs 1 (would fit).
    scheduler = _scheduler(num_blocks=9, block_size=4)
    a, b, c = _seq(0, 20, 4), _seq(1, 12, 4, variant=1), _seq(2, 2, 2)
    scheduler.add(a)
    _step(scheduler)
    scheduler.add(b)
    scheduler.add(c)
    assert scheduler.blocks.num_free_blocks == 2
    plan = _step(scheduler)
    assert _tokens(plan) == {0: 1}
    assert list(scheduler.waiting) == [b, c]
    assert c.block_ids == [] and c.status is SequenceStatus.WAITING
    # No starvation: B runs as soon as A's blocks come back, and before C.
    while a.status is not SequenceStatus.FINISHED:
        assert set(_tokens(_step(scheduler))) == {0}
    plan = _step(scheduler)
    assert scheduler.running == [b, c]  # admitted in arrival order (the plan lists shorter queries first)
    assert _tokens(plan) == {1: 12, 2: 2}


def test_fifo_blocks_admission_even_when_batch_room_remains():
    scheduler = _scheduler(num_blocks=5, block_size=4)  # 4 usable blocks
    big, small = _seq(0, 12, 1), _seq(1, 1, 1)  # big needs all 4 blocks
    scheduler.add(_seq(9, 1, 2))  # holds 1 block
    _step(scheduler)
    scheduler.add(big)
    scheduler.add(small)
    assert _tokens(_step(scheduler)) == {9: 1}
    assert list(scheduler.waiting) == [big, small]


def test_step_budget_counts_decodes_and_chunks_long_prompt():
    scheduler = _scheduler(max_step_tokens=8)
    decoders = [_seq(i, 2, 50) for i in range(3)]
    for seq in decoders:
        scheduler.add(seq)
    assert _step(scheduler).num_tokens == 6
    long = _seq(10, 10, 3)
    scheduler.add(long)
    plan = _step(scheduler)
    assert _tokens(plan) == {0: 1, 1: 1, 2: 1, 10: 5}
    assert plan.num_tokens == 8
    assert not plan.scheduled[-1].is_sampling  # mid-prompt chunk: no token drawn
    assert long.num_computed_tokens == 5 and long.num_generated_tokens == 0
    plan = _step(scheduler)
    assert _tokens(plan) == {0: 1, 1: 1, 2: 1, 10: 5}
    assert plan.scheduled[-1].is_sampling
    assert long.num_generated_tokens == 1
    assert _tokens(_step(scheduler)) == {0: 1, 1: 1, 2: 1, 10: 1}


def test_long_prompt_alone_is_chunked_across_steps():
    scheduler = _scheduler(max_step_tokens=8)
    seq = _seq(0, 20, 2)
    scheduler.add(seq)
    chunks = []
    while seq.status is not SequenceStatus.FINISHED:
        plan = _step(scheduler)
        chunks.append((plan.scheduled[0].num_new_tokens, plan.scheduled[0].is_sampling))
    assert chunks == [(8, False), (8, False), (4, True), (1, True)]


def test_budget_bounds_running_decodes_too():
    scheduler = _scheduler(max_step_tokens=2)
    for i in range(3):
        scheduler.add(_seq(i, 1, 5))
    assert _tokens(_step(scheduler)) == {0: 1, 1: 1}
    assert _tokens(_step(scheduler)) == {0: 1, 1: 1}  # budget spent on decodes: request 2 waits
    assert len(scheduler.waiting) == 1


def test_prompt_kept_whole_when_chunking_is_not_allowed():
    scheduler = _scheduler(max_step_tokens=12, chunking=False)
    decoder = _seq(0, 2, 3)
    scheduler.add(decoder)
    _step(scheduler)
    long = _seq(1, 12, 1)
    scheduler.add(long)
    while decoder.status is not SequenceStatus.FINISHED:
        assert _tokens(_step(scheduler)) == {0: 1}  # 1 + 12 > 12: the prompt waits, whole
        assert long.status is SequenceStatus.WAITING
    plan = _step(scheduler)
    assert _tokens(plan) == {1: 12}
    assert plan.scheduled[0].is_sampling


def test_max_batch_size_bounds_running_set():
    scheduler = _scheduler(max_batch_size=2)
    seqs = [_seq(0, 2, 2)] + [_seq(i, 2, 10) for i in range(1, 4)]
    for seq in seqs:
        scheduler.add(seq)
    assert _tokens(_step(scheduler)) == {0: 2, 1: 2}
    assert len(scheduler.running) == 2 and len(scheduler.waiting) == 2
    assert _tokens(_step(scheduler)) == {0: 1, 1: 1}  # request 0 finishes at its 2nd token
    assert scheduler.running == [seqs[1]]
    assert _tokens(_step(scheduler)) == {1: 1, 2: 2}
    assert scheduler.running == seqs[1:3] and list(scheduler.waiting) == [seqs[3]]


def test_finish_running_sequence_frees_blocks_at_once():
    scheduler = _scheduler(num_blocks=9, block_size=4)
    seq = _seq(0, 5, 7)
    scheduler.add(seq)
    _step(scheduler)
    assert len(seq.block_ids) == 3 and scheduler.blocks.num_free_blocks == 5
    scheduler.finish(seq)
    assert scheduler.blocks.num_free_blocks == 8
    assert seq.status is SequenceStatus.FINISHED and seq.block_ids == []
    assert not scheduler.has_work
    assert not scheduler.schedule()
    scheduler.finish(seq)  # a second finish (late cancel) changes nothing
    assert scheduler.blocks.num_free_blocks == 8


def test_finish_waiting_sequence_removes_it():
    scheduler = _scheduler(num_blocks=3, block_size=4)
    first, second = _seq(0, 4, 4), _seq(1, 2, 2)
    scheduler.add(first)
    scheduler.add(second)
    _step(scheduler)
    assert list(scheduler.waiting) == [second]
    scheduler.finish(second)
    assert not scheduler.waiting and second.status is SequenceStatus.FINISHED
    assert scheduler.blocks.num_free_blocks == 0
    assert _tokens(_step(scheduler)) == {0: 1}


def test_cancelled_head_unblocks_queue():
    scheduler = _scheduler(num_blocks=5, block_size=4)
    scheduler.add(_seq(0, 8, 4))  # 3 of 4 blocks
    _step(scheduler)
    big, small = _seq(1, 8, 4), _seq(2, 2, 2)
    scheduler.add(big)
    scheduler.add(small)
    assert _tokens(_step(scheduler)) == {0: 1}
    scheduler.finish(big)
    assert _tokens(_step(scheduler)) == {0: 1, 2: 2}


@pytest.mark.parametrize(("prompt", "max_new", "block_size", "expected"),
                         [(1, 1, 4, 1), (3, 1, 4, 1), (4, 1, 4, 2), (5, 3, 4, 2), (16, 16, 16, 2), (17, 16, 16, 3),
                          (7, 9, 1, 16)])
def test_admission_reserves_blocks_for_whole_budget(prompt, max_new, block_size, expected):
    scheduler = _scheduler(num_blocks=40, block_size=block_size)
    seq = _seq(0, prompt, max_new)
    scheduler.add(seq)
    scheduler.schedule()
    assert len(seq.block_ids) == expected == -(-(prompt + max_new) // block_size)
    assert 0 not in seq.block_ids
    assert scheduler.blocks.num_free_blocks == 39 - expected


def test_request_that_can_never_fit_is_refused():
    scheduler = _scheduler(num_blocks=3, block_size=4)  # 8 slots
    assert scheduler.can_ever_fit(8)
    assert not scheduler.can_ever_fit(9)
    with pytest.raises(EngineInvariantError, match="can never fit"):
        scheduler.add(_seq(0, 5, 4))


def test_admission_starts_after_the_cached_prefix_and_holds_its_blocks_once():
    scheduler = _scheduler(num_blocks=12, block_size=4, max_step_tokens=64)  # 11 usable blocks
    first = _seq(0, 10, 1)  # prompt 1..10: two full blocks once computed
    scheduler.add(first)
    plan = scheduler.schedule()
    first_blocks = list(first.block_ids)
    _compute(scheduler, plan)  # prompt computed, one token sampled: max_new_tokens reached, finished
    assert first.status is SequenceStatus.FINISHED
    assert scheduler.blocks.num_cached_free_blocks == 2
    same, other = _seq(1, 10, 6), _seq(2, 3, 2)
    same.token_ids[9] = same.request.input_ids[9] = 49  # the same first 8 tokens, a different last one
    for seq in (same, other):
        scheduler.add(seq)
    plan = scheduler.schedule()
    assert _tokens(plan) == {1: 2, 2: 3}  # 10 - 8 cached tokens, and the whole short prompt
    assert (same.num_computed_tokens, same.num_cached_tokens) == (8, 8)
    assert same.block_ids[:2] == first_blocks[:2] and len(same.block_ids) == 4  # 16 slots reserved
    assert same.block_hashes == first.block_hashes[:2]
    assert scheduler.blocks.num_free_blocks == 11 - 4 - 2
    _compute(scheduler, plan)
    assert len(same.block_hashes) == 2  # the third block holds 2 computed tokens: not full yet
    twin = _seq(3, 10, 6)  # the first prompt again, while `same` holds the shared blocks
    scheduler.add(twin)
    _step(scheduler)
    assert twin.block_ids[:2] == same.block_ids[:2] and twin.num_cached_tokens == 8
    assert [scheduler.blocks.ref_count(b) for b in twin.block_ids[:2]] == [2, 2]
    scheduler.blocks.check_invariants()


def test_requests_arriving_together_compute_their_shared_prefix_once():
    """Three requests with one 9-token prefix (blocks of 4) queued at once: the first computes it; the next
    waits while its next block is being computed (and the third behind it: nobody is overtaken), then both
    reuse the two full blocks and compute only the rest. A prompt that shares no block is not held."""
    scheduler = _scheduler(block_size=4, max_step_tokens=16)
    first, second, third = _seq(0, 12, 2), _seq(1, 12, 2, variant=0), _seq(2, 11, 2)
    second.token_ids[10] = second.request.input_ids[10] = 77  # shares tokens 0..9 with `first`
    for seq in (first, second, third):
        scheduler.add(seq)
    assert _tokens(_step(scheduler)) == {0: 12}  # the others wait for blocks 0 and 1
    shared = first.block_ids[:2]
    plan = _step(scheduler)
    assert _tokens(plan) == {0: 1, 1: 4, 2: 3}  # first decodes; the others start after 8 cached tokens
    assert (second.num_cached_tokens, third.num_cached_tokens) == (8, 8)
    assert second.block_ids[:2] == shared == third.block_ids[:2]
    scheduler.blocks.check_invariants()

    alone = _scheduler(block_size=4, max_step_tokens=16)
    a, b = _seq(0, 8, 1), _seq(1, 8, 1, variant=1)  # differ at token 3: no shared block
    alone.add(a)
    alone.add(b)
    assert _tokens(alone.schedule()) == {0: 8, 1: 8}


def test_a_chunked_prompt_holds_the_requests_sharing_it_until_their_blocks_are_cached():
    scheduler = _scheduler(block_size=4, max_step_tokens=8)
    first, second = _seq(0, 20, 1), _seq(1, 20, 1)  # the same prompt: 4 reusable blocks (19 tokens)
    scheduler.add(first)
    scheduler.add(second)
    steps = [_tokens(_step(scheduler)) for _ in range(3)]
    assert steps[:2] == [{0: 8}, {0: 8}]  # `second` waits while `first` computes blocks 0-3 in chunks
    assert steps[2] == {0: 4, 1: 4} and second.num_cached_tokens == 16  # then reuses 4 blocks, computes 4


def test_no_wait_without_prefix_caching_or_for_prompt_logprobs():
    for is_caching, wants_logprobs in ((False, False), (True, True)):
        scheduler = Scheduler(BlockManager(64, 4, is_prefix_caching=is_caching), 64, None)
        first, second = _seq(0, 12, 1), _seq(1, 12, 1)
        second.request.prefill_logprobs = wants_logprobs
        scheduler.add(first)
        scheduler.add(second)
        assert _tokens(scheduler.schedule()) == {0: 12, 1: 12}


def test_a_request_asking_for_its_prompt_logprobs_computes_the_whole_prompt():
    scheduler = _scheduler(block_size=4)
    scheduler.add(_seq(0, 10, 1))
    _step(scheduler)
    seq = _seq(1, 10, 1)
    seq.request.prefill_logprobs = True
    scheduler.add(seq)
    assert _tokens(scheduler.schedule()) == {1: 10} and seq.num_cached_tokens == 0


@pytest.mark.parametrize("num_blocks", [3, -1])  # the whole prompt (nothing left to sample from); hashes missing
def test_an_impossible_cached_prefix_is_an_invariant_error(num_blocks):
    class Broken(BlockManager):
        def cached_prefix(self, token_ids):
            return [1, 2, 3][:num_blocks], [b"h"] * 3

    scheduler = Scheduler(Broken(64, 4), 64, None)
    scheduler.add(_seq(0, 12, 2))
    with pytest.raises(EngineInvariantError, match="cached blocks for 12 prompt tokens"):
        scheduler.schedule()


def test_advance_hashes_each_block_once_it_is_full_of_computed_tokens():
    """Expected hashes: `block_hash` chained by hand over the prompt's blocks."""
    scheduler = _scheduler(block_size=4, max_step_tokens=6)
    seq = _seq(0, 10, 4)
    scheduler.add(seq)
    _step(scheduler)  # 6 of 10 prompt tokens: one full block
    first = block_hash(ROOT_HASH, seq.token_ids[:4])
    assert seq.block_hashes == [first]
    _step(scheduler)  # the rest of the prompt (10 computed) and a sampled token
    second = block_hash(first, seq.token_ids[4:8])
    assert seq.block_hashes == [first, second]
    assert [scheduler.blocks.cached_block(h) for h in seq.block_hashes] == seq.block_ids[:2]
    _step(scheduler)  # 11 computed: the third block is not full yet
    assert len(seq.block_hashes) == 2
    _step(scheduler)  # 12 computed, the last of them a generated token
    assert seq.block_hashes[2] == block_hash(second, seq.token_ids[8:12])


def test_steps_carry_the_highest_block_handed_out():
    scheduler = _scheduler(num_blocks=16, block_size=4)
    a, b = _seq(0, 5, 3), _seq(1, 2, 2)  # 2 blocks, then 1
    scheduler.add(a)
    assert _step(scheduler).max_block_id == 2
    scheduler.add(b)
    plan = _step(scheduler)
    assert plan.max_block_id == 3 == max(a.block_ids + b.block_ids)
    scheduler.finish(a)
    assert _step(scheduler).max_block_id == 3  # blocks 1 and 2 were written once: still counted


def test_the_scheduler_imports_no_torch():
    """The scheduler, its plan and the block manager are pure Python (checked in a fresh interpreter)."""
    script = textwrap.dedent("""
        import sys
        import tgserve.core.scheduler
        import tgserve.core.step_plan
        print(sorted(name for name in sys.modules if name == "torch" or name.startswith("torch.")))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# --- property: random arrivals, cancels and steps ---------------------------------------------------

_limits = st.fixed_dictionaries({
    "num_blocks": st.integers(2, 24),
    "block_size": st.integers(1, 8),
    "max_step_tokens": st.integers(1, 32),
    "max_batch_size": st.none() | st.integers(1, 6),
    "chunking": st.booleans(),
})
_op = st.one_of(
    # prompt length, max_new_tokens, prompt variant (0: the shared prompt, so prefixes repeat and blocks are reused)
    st.tuples(st.just("arrive"), st.integers(1, 40), st.integers(1, 12), st.integers(0, 2)),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("step")),
)


def _check_invariants(scheduler: Scheduler, limits: dict, kv: dict | None = None) -> None:
    """The block manager's own check, holders = the running sequences' references, and (with `kv`,
    what `_write_kv` recorded) every computed position of every running sequence still holds its token."""
    blocks = scheduler.blocks
    blocks.check_invariants()
    held = Counter(b for seq in scheduler.running for b in seq.block_ids)
    assert all(len(seq.block_ids) == len(set(seq.block_ids)) for seq in scheduler.running), "a block twice in one"
    assert 0 not in held, "block 0 handed out"
    assert all(blocks.ref_count(b) == n for b, n in held.items()), "holders differ from the references"
    assert blocks.num_free_blocks + len(held) == blocks.num_usable_blocks, "a block was lost or double-freed"
    if limits["max_batch_size"] is not None:
        assert len(scheduler.running) <= limits["max_batch_size"]
    size = blocks.block_size
    for seq in scheduler.running:
        assert seq.status is SequenceStatus.RUNNING
        assert len(seq.block_ids) == blocks.blocks_for(seq.max_tokens)
        assert len(seq.block_hashes) == seq.num_computed_tokens // size, "a full block unhashed"
        if kv is not None:
            for pos in range(seq.num_computed_tokens):
                written = kv.get((seq.block_ids[pos // size], pos % size))
                assert written == seq.token_ids[pos], f"request {seq.request_id} position {pos} overwritten or unset"
    for seq in scheduler.waiting:
        assert seq.status is SequenceStatus.WAITING and seq.block_ids == [] and seq.num_computed_tokens == 0


def _write_kv(scheduler: Scheduler, plan, kv: dict) -> None:
    """What the model does with a plan's K/V: write each computed position's token into its slot, only
    ever into a block its sequence alone holds and that no one can find through the prefix cache."""
    blocks, size = scheduler.blocks, scheduler.blocks.block_size
    for item in plan.scheduled:
        seq = item.seq
        for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + item.num_new_tokens):
            block_id = seq.block_ids[pos // size]
            assert blocks.ref_count(block_id) == 1, f"writing block {block_id}, which another request holds"
            assert pos // size >= len(seq.block_hashes), "writing a full, hashed (findable) block"
            kv[(block_id, pos % size)] = seq.token_ids[pos]


def _check_plan(plan, scheduler: Scheduler, limits: dict) -> None:
    assert plan.num_tokens <= limits["max_step_tokens"]
    seqs = [item.seq for item in plan.scheduled]
    assert len(seqs) == len(set(map(id, seqs)))
    for item in plan.scheduled:
        seq = item.seq
        assert item.num_new_tokens >= 1
        end = seq.num_computed_tokens + item.num_new_tokens
        assert end <= len(seq.token_ids)
        assert end <= len(seq.block_ids) * scheduler.blocks.block_size, "KV written past the reserved blocks"
        if not limits["chunking"] and seq.num_computed_tokens == 0:
            assert item.num_new_tokens == seq.num_prompt_tokens, "prompt chunked although chunking is off"


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(limits=_limits, ops=st.lists(_op, max_size=60))
def test_random_traffic_keeps_invariants_and_serves_everyone(limits, ops):
    scheduler = _scheduler(limits["num_blocks"], limits["block_size"], limits["max_step_tokens"],
                           limits["max_batch_size"], limits["chunking"])
    arrived: list[Sequence] = []
    cancelled: set[int] = set()
    admitted: list[int] = []
    kv: dict[tuple[int, int], int] = {}  # (block, slot) -> the token whose K/V it holds

    def step():
        plan = scheduler.schedule()
        _check_plan(plan, scheduler, limits)
        # Requests admitted in the same step are simultaneous (the plan lists one-token rows first).
        admitted.extend(sorted(item.seq.request_id for item in plan.scheduled
                               if item.seq.num_computed_tokens == item.seq.num_cached_tokens
                               and item.seq.num_computed_tokens < item.seq.num_prompt_tokens))
        _check_invariants(scheduler, limits, kv)
        _write_kv(scheduler, plan, kv)
        _compute(scheduler, plan)
        _check_invariants(scheduler, limits, kv)

    for op in ops:
        if op[0] == "arrive":
            prompt, max_new = op[1], op[2]
            if not limits["chunking"]:
                prompt = min(prompt, limits["max_step_tokens"])  # start-up ensures max_input <= prefill budget
            if not scheduler.can_ever_fit(prompt + max_new):
                continue  # the engine refuses it at submit
            seq = _seq(len(arrived), prompt, max_new, op[3])
            arrived.append(seq)
            scheduler.add(seq)
        elif op[0] == "cancel":
            live = [s for s in arrived if s.status is not SequenceStatus.FINISHED]
            if live:
                seq = live[op[1] % len(live)]
                cancelled.add(seq.request_id)
                scheduler.finish(seq)
                _check_invariants(scheduler, limits)
        else:
            step()

    # Drain: every step computes at least one token, so this many steps are enough for everyone.
    max_steps = sum(s.max_tokens for s in arrived) + 1
    for _ in range(max_steps):
        if not scheduler.has_work:
            break
        step()
    assert not scheduler.has_work, "a request starved"
    assert scheduler.blocks.num_free_blocks == scheduler.blocks.num_usable_blocks
    assert admitted == sorted(admitted), "a later request overtook an earlier one"
    for seq in arrived:
        assert seq.status is SequenceStatus.FINISHED and seq.block_ids == []
        if seq.request_id not in cancelled:
            assert seq.num_generated_tokens == seq.request.stopping.max_new_tokens


def test_proposed_tokens_are_verified_in_one_step_or_dropped_to_fit_the_budget():
    """A decoding sequence with k proposed tokens computes k + 1 positions and samples at all of them;
    when the step's budget is short, the proposals that do not fit are dropped (never computed
    unverified), and a sequence without room samples at its one position as before."""
    scheduler = _scheduler(max_step_tokens=8)
    a, b = _seq(0, 3, 20), _seq(1, 3, 20)
    scheduler.add(a)
    scheduler.add(b)
    _step(scheduler)  # both prompts
    for seq in (a, b):
        seq.token_ids += [11, 12, 13, 14]
        seq.num_proposed_tokens = 4
    plan = scheduler.schedule()
    assert {item.seq.request_id: (item.num_new_tokens, item.num_sampled) for item in plan.scheduled} == {
        0: (5, 5), 1: (3, 3)}
    assert a.token_ids[-4:] == [11, 12, 13, 14] and a.num_proposed_tokens == 4
    assert b.token_ids[-3:] == [_NEXT_TOKEN, 11, 12] and b.num_proposed_tokens == 2
    assert len(b.token_ids) == 3 + 1 + 2


def test_a_step_lists_shorter_queries_first():
    """Decodes, then verifications of a few guesses, then prompt chunks (stable among equals): attention
    takes the leading short queries apart from the prefill rows (backends/cpu/native_attention.py)."""
    scheduler = _scheduler(max_step_tokens=64)
    a, b, c = _seq(0, 3, 20), _seq(1, 3, 20), _seq(2, 3, 20)
    for seq in (a, b, c):
        scheduler.add(seq)
    _step(scheduler)
    a.token_ids += [11, 12, 13]
    a.num_proposed_tokens = 3
    d, e = _seq(3, 9, 4), _seq(4, 2, 4)
    scheduler.add(d)
    scheduler.add(e)
    plan = scheduler.schedule()
    assert [(item.seq.request_id, item.num_new_tokens) for item in plan.scheduled] == [
        (1, 1), (2, 1), (4, 2), (0, 4), (3, 9)]
    assert scheduler.running == [a, b, c, d, e]
