"""Step inputs: each field of the ForwardBatch against a per-token brute force written here, from
persistent buffers that keep their address from step to step, padded to buckets where declared."""
from __future__ import annotations

import pytest
import torch

from tgserve.core.invariants import EngineInvariantError
from tgserve.core.request import GenerationRequest, SamplingParams, StoppingParams
from tgserve.core.sequence import Sequence
from tgserve.core.shape_constraints import ShapeConstraints
from tgserve.core.step_inputs import StepInputs, step_capacity
from tgserve.core.step_plan import ScheduledSequence, StepPlan

BLOCK_SIZE = 4


def _seq(request_id, token_ids, num_computed, block_ids, batch_slot=None):
    request = GenerationRequest(list(token_ids), SamplingParams(), StoppingParams(max_new_tokens=4))
    seq = Sequence(request_id, request, list(token_ids), len(token_ids), len(token_ids) + 4)
    seq.num_computed_tokens, seq.block_ids, seq.batch_slot = num_computed, list(block_ids), batch_slot
    return seq


def _plan(*items):
    """items: (seq, num_new_tokens[, num_sampled]) in plan order."""
    plan = StepPlan()
    for seq, num_new, *sampled in items:
        scheduled = ScheduledSequence(seq, num_new)
        if sampled:
            scheduled.num_sampled = sampled[0]  # as a verifying step would set it
        plan.scheduled.append(scheduled)
    return plan


def _steps():
    """Two consecutive steps: (decode, decode, chunk) then (decode, 3 positions sampled at the last 2)."""
    a = _seq(0, range(10, 17), 6, [3, 5])  # decode at position 6
    b = _seq(1, [4], 0, [7])  # 1-token prompt
    c = _seq(2, range(30, 41), 4, [8, 1, 9])  # chunk of 5 from position 4, not at the end: nothing sampled
    first = _plan((b, 1), (a, 1), (c, 5))
    d = _seq(3, range(50, 60), 7, [2, 6, 11])  # 3 positions from 7, samples at the last 2 (1 proposal verified)
    second = _plan((a, 1), (d, 3, 2))
    return [first, second]


def _expected(plan):
    """Per-token brute force: ids, positions, slots, and the logits rows of each sequence's last samples."""
    ids, positions, slots, logits, row = [], [], [], [], 0
    for item in plan.scheduled:
        seq = item.seq
        for position in range(seq.num_computed_tokens, seq.num_computed_tokens + item.num_new_tokens):
            ids.append(seq.token_ids[position])
            positions.append(position)
            slots.append(seq.block_ids[position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE)
            row += 1
        logits += range(row - item.num_sampled, row)
    return ids, positions, slots, logits


def _inputs(constraints=None):
    return StepInputs(step_capacity(32, 8, 40, 12, BLOCK_SIZE, constraints), BLOCK_SIZE, torch.device("cpu"),
                      constraints)


def test_fields_match_a_per_token_brute_force_in_reused_buffers():
    inputs = _inputs()
    addresses = set()
    for plan in _steps():
        batch = inputs.prepare(plan)
        ids, positions, slots, logits = _expected(plan)
        assert batch.input_ids.tolist() == ids
        assert batch.positions.tolist() == positions
        assert batch.slot_mapping.tolist() == slots
        assert batch.logits_indices.tolist() == logits
        query_lens = [item.num_new_tokens for item in plan.scheduled]
        context_lens = [item.seq.num_computed_tokens + item.num_new_tokens for item in plan.scheduled]
        assert batch.query_lens.tolist() == query_lens
        assert batch.context_lens.tolist() == context_lens
        assert batch.cu_seqlens_q.tolist() == [sum(query_lens[:i]) for i in range(len(query_lens) + 1)]
        width = -(-max(context_lens) // BLOCK_SIZE)
        assert batch.block_tables.tolist() == [(item.seq.block_ids + [0] * width)[:width] for item in plan.scheduled]
        assert (batch.num_tokens, batch.num_seqs) == (len(ids), len(plan.scheduled))
        assert batch.batch_slots is None
        addresses.add(tuple(t.data_ptr() for t in (batch.input_ids, batch.positions, batch.slot_mapping,
                                                   batch.block_tables, batch.cu_seqlens_q, batch.logits_indices)))
    assert len(addresses) == 1  # the same persistent buffers, refilled


def test_padded_to_the_smallest_bucket_that_fits():
    constraints = ShapeConstraints(max_batch_size=8, prefill_token_buckets=(8, 16, 32), decode_batch_buckets=(2, 4, 8),
                                   is_slot_based=True)
    inputs = _inputs(constraints)
    first, second = _steps()
    for item, slot in zip(first.scheduled, (5, 0, 2)):
        item.seq.batch_slot = slot
    batch = inputs.prepare(first)  # 3 sequences, 7 tokens
    assert (batch.input_ids.shape[0], batch.query_lens.shape[0]) == (8, 4)
    ids, positions, slots, logits = _expected(first)
    assert batch.input_ids.tolist() == ids + [0]
    assert batch.positions.tolist() == positions + [0]
    assert batch.slot_mapping.tolist()[:7] == slots and batch.slot_mapping[7] < BLOCK_SIZE  # padding: block 0
    assert batch.logits_indices.tolist() == logits
    assert batch.query_lens.tolist() == [1, 1, 5, 0] and batch.context_lens.tolist() == [1, 7, 9, 0]
    assert batch.cu_seqlens_q.tolist() == [0, 1, 2, 7, 7]
    assert batch.block_tables.shape[1] == inputs.capacity.max_blocks_per_seq and batch.block_tables[3].sum() == 0
    assert batch.batch_slots.tolist() == [5, 0, 2, -1]
    decode_only = _plan((first.scheduled[1].seq, 1), (first.scheduled[0].seq, 1), (second.scheduled[1].seq, 1))
    batch = inputs.prepare(decode_only)
    assert (batch.input_ids.shape[0], batch.query_lens.shape[0]) == (4, 4)  # a decode step: rows = batch bucket


def test_a_step_larger_than_the_buffers_is_refused():
    inputs = StepInputs(step_capacity(4, 8, 40, 12, BLOCK_SIZE), BLOCK_SIZE, torch.device("cpu"))
    with pytest.raises(EngineInvariantError, match="larger than the step inputs hold"):
        inputs.prepare(_plan((_seq(0, range(9), 0, [1, 2, 3]), 9)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA (or ROCm) GPU: pinned staging, async copies")
def test_pinned_staging_to_a_gpu_over_consecutive_steps():
    """The cuda backend's inputs (pinned, async copies): each step's fields still match the brute force,
    also when the next step rewrites the staging buffer right after the previous step's copies."""
    inputs = StepInputs(step_capacity(32, 8, 40, 12, BLOCK_SIZE), BLOCK_SIZE, torch.device("cuda"), is_pinned=True)
    seen = []
    for plan in _steps() * 3:  # no host sync in between: as a step whose forward is still queued
        batch = inputs.prepare(plan)
        seen.append([t.clone() for t in (batch.input_ids, batch.positions, batch.slot_mapping, batch.logits_indices)])
    for plan, tensors in zip(_steps() * 3, seen):
        assert [t.tolist() for t in tensors] == list(_expected(plan))
