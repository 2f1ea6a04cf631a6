"""Scheduler under a backend's `ShapeConstraints`: no step past the largest bucket, fixed batch slots.

Oracles: the declared constraints, and a model of slot ownership kept here (which request holds which
slot, from admission to finish).
"""
from __future__ import annotations

import pytest

from tgserve.core.block_manager import BlockManager
from tgserve.core.invariants import EngineInvariantError
from tgserve.core.scheduler import Scheduler
from tgserve.core.sequence import SequenceStatus
from tgserve.core.shape_constraints import ShapeConstraints

from .test_scheduler import _compute, _seq


def _run(scheduler: Scheduler, seqs, max_steps=200):
    """Step until every sequence finished; yields each plan."""
    for seq in seqs:
        scheduler.add(seq)
    for _ in range(max_steps):
        if not scheduler.has_work:
            return
        plan = scheduler.schedule()
        yield plan
        _compute(scheduler, plan)
    raise AssertionError("did not finish")


def test_no_step_is_larger_than_the_largest_buckets():
    constraints = ShapeConstraints(prefill_token_buckets=(8, 16, 24), decode_batch_buckets=(1, 2, 3))
    scheduler = Scheduler(BlockManager(200, 4), max_batch_prefill_tokens=100, max_batch_size=10,
                          constraints=constraints)
    plans = list(_run(scheduler, [_seq(i, 5 + 7 * i, 4, variant=i + 1) for i in range(6)]))  # no shared block
    assert max(plan.num_tokens for plan in plans) == 24
    assert max(len(plan.scheduled) for plan in plans) == 3


def test_each_request_holds_one_slot_from_admission_to_finish():
    constraints = ShapeConstraints(max_batch_size=3, is_slot_based=True)
    scheduler = Scheduler(BlockManager(200, 4), max_batch_prefill_tokens=64, max_batch_size=3,
                          constraints=constraints)
    seqs = [_seq(i, 3 + i, 2 + (5 * i) % 7) for i in range(8)]
    holder: dict[int, int] = {}  # slot -> request id holding it
    slot_of: dict[int, int] = {}
    for plan in _run(scheduler, seqs):
        for slot, request_id in list(holder.items()):
            if seqs[request_id].status is SequenceStatus.FINISHED:  # finished last step: its slot is free again
                del holder[slot]
        for item in plan.scheduled:
            seq = item.seq
            assert 0 <= seq.batch_slot < 3
            assert holder.setdefault(seq.batch_slot, seq.request_id) == seq.request_id  # nobody else holds it
            assert slot_of.setdefault(seq.request_id, seq.batch_slot) == seq.batch_slot  # never moves
    assert len(slot_of) == len(seqs) and set(slot_of.values()) == {0, 1, 2}


def test_a_slot_based_backend_must_declare_its_batch_size():
    with pytest.raises(EngineInvariantError, match="max_batch_size"):
        Scheduler(BlockManager(20, 4), 64, None, constraints=ShapeConstraints(is_slot_based=True))
