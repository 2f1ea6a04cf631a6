"""Step inputs: the device tensors a model forward reads, persistent and filled in place from a plan.

Every input field lives in one device buffer allocated at start-up for the largest step
(`StepCapacity`), beside one host staging buffer of the same layout. Each step writes the plan into
the staging buffer (a few list writes per sequence; positions, slot mapping and the rest come out of
vectorised numpy, no Python loop per token) and copies each field's used prefix to the device once.
The `ForwardBatch` fields are views of the device buffer, so their addresses never change: a backend
can capture graphs over them. Where the backend declares buckets (`ShapeConstraints`), the views are
padded to the smallest bucket that fits: padding tokens (id 0, position 0) write their K/V into the
reserved block 0 and are never sampled; padding sequences compute no token, have context 0 and a
block table of block 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tgserve.core.forward_batch import ForwardBatch
from tgserve.core.invariants import EngineInvariantError
from tgserve.core.shape_constraints import ShapeConstraints, bucket_for
from tgserve.core.step_plan import StepPlan

NO_SLOT = -1  # batch slot of a padding sequence, and of every sequence where slots are not used


@dataclass(slots=True, frozen=True)
class StepCapacity:
    """The largest step the persistent buffers hold (host ints, set once at start-up)."""

    max_num_tokens: int  # token rows, padding included
    max_num_seqs: int  # sequence rows, padding included
    max_blocks_per_seq: int  # block-table width: blocks of the longest sequence


# Field name -> rows it holds as a function of (tokens, seqs, blocks per seq); all int64.
_FIELDS = {
    "input_ids": lambda t, s, b: t,
    "positions": lambda t, s, b: t,
    "slot_mapping": lambda t, s, b: t,
    "logits_indices": lambda t, s, b: t,
    "query_lens": lambda t, s, b: s,
    "context_lens": lambda t, s, b: s,
    "cu_seqlens_q": lambda t, s, b: s + 1,
    "batch_slots": lambda t, s, b: s,
    "block_tables": lambda t, s, b: s * b,
}


class StepInputs:
    """Turns a `StepPlan` into a `ForwardBatch` of views of persistent device buffers (attention not
    prepared: the runner does that). One instance per runner; `prepare` runs once per step."""

    def __init__(self, capacity: StepCapacity, block_size: int, device: torch.device,
                 constraints: ShapeConstraints | None = None, is_pinned: bool = False):
        """is_pinned: stage in page-locked host memory, so the copies run asynchronously (a backend's
        answer: it helps where the device has its own memory, and does not apply to a CPU)."""
        self.capacity = capacity
        self.block_size = block_size
        self.device = device
        self.constraints = constraints or ShapeConstraints()
        sizes = {name: rows(capacity.max_num_tokens, capacity.max_num_seqs, capacity.max_blocks_per_seq)
                 for name, rows in _FIELDS.items()}
        self._offsets, total = {}, 0
        for name, size in sizes.items():
            self._offsets[name] = total
            total += size
        host = torch.zeros(total, dtype=torch.int64)
        self._host = host.pin_memory() if is_pinned else host  # the one staging buffer
        self._host_np = self._host.numpy()
        self._device = torch.zeros(total, dtype=torch.int64, device=device)  # every field's persistent home
        # Pinned copies run asynchronously: the next step waits for them before it rewrites the staging.
        self._copies_done = torch.Event(device=device) if is_pinned else None

    def _views(self, name: str, size: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """(host numpy view, host tensor view, device tensor view) of the first `size` rows of a field."""
        start = self._offsets[name]
        return (self._host_np[start:start + size], self._host[start:start + size],
                self._device[start:start + size])

    def prepare(self, plan: StepPlan) -> ForwardBatch:
        """Fill the buffers for `plan` and return the step's batch (views, padded to the buckets)."""
        if self._copies_done is not None:
            self._copies_done.synchronize()
        ids: list[int] = []
        query_lens, starts, num_sampled, slots, tables = [], [], [], [], []
        for item in plan.scheduled:
            seq, start = item.seq, item.seq.num_computed_tokens
            ids += seq.token_ids[start:start + item.num_new_tokens]
            query_lens.append(item.num_new_tokens)
            starts.append(start)
            num_sampled.append(item.num_sampled)
            slots.append(NO_SLOT if seq.batch_slot is None else seq.batch_slot)
            tables.append(seq.block_ids)
        num_seqs, num_tokens = len(query_lens), len(ids)
        q = np.array(query_lens, dtype=np.int64)
        context = np.array(starts, dtype=np.int64) + q
        max_context_len = int(context.max())
        num_decode = next((i for i, n in enumerate(query_lens) if n != 1), num_seqs)  # the runner's leading rows
        padded_seqs, padded_tokens = self._padded_sizes(num_seqs, num_tokens, num_decode == num_seqs)
        width = -(-max_context_len // self.block_size)
        if self.constraints.prefill_token_buckets or self.constraints.decode_batch_buckets:
            width = self.capacity.max_blocks_per_seq  # a fixed shape, as compiled graphs need
        self._check_fits(padded_tokens, padded_seqs, width)

        cu_np, cu_host, cu = self._views("cu_seqlens_q", padded_seqs + 1)
        cu_np[0] = 0
        np.cumsum(q, out=cu_np[1:num_seqs + 1])
        cu_np[num_seqs + 1:] = num_tokens
        q_np, q_host, query_lens_t = self._views("query_lens", padded_seqs)
        q_np[:num_seqs] = q
        q_np[num_seqs:] = 0
        ctx_np, ctx_host, context_lens = self._views("context_lens", padded_seqs)
        ctx_np[:num_seqs] = context
        ctx_np[num_seqs:] = 0
        slot_np, slot_host, batch_slots = self._views("batch_slots", padded_seqs)
        slot_np[:num_seqs] = slots
        slot_np[num_seqs:] = NO_SLOT
        table_np, table_host, table_flat = self._views("block_tables", padded_seqs * width)
        table_np[:] = 0
        table_rows = table_np.reshape(padded_seqs, width)
        for row, table in zip(table_rows, tables):
            used = table[:width]
            row[:len(used)] = used

        ids_np, ids_host, input_ids = self._views("input_ids", padded_tokens)
        ids_np[:num_tokens] = ids
        ids_np[num_tokens:] = 0
        seq_of_token = np.repeat(np.arange(num_seqs), q)
        pos_np, pos_host, positions = self._views("positions", padded_tokens)
        pos_np[:num_tokens] = np.arange(num_tokens) + np.repeat(context - q - cu_np[:num_seqs], q)
        pos_np[num_tokens:] = 0
        slot_map_np, slot_map_host, slot_mapping = self._views("slot_mapping", padded_tokens)
        real_pos = pos_np[:num_tokens]
        slot_map_np[:num_tokens] = (table_rows[seq_of_token, real_pos // self.block_size] * self.block_size
                                    + real_pos % self.block_size)
        slot_map_np[num_tokens:] = np.arange(padded_tokens - num_tokens) % self.block_size  # block 0
        sampled = np.array(num_sampled, dtype=np.int64)
        num_logits = int(sampled.sum())
        logits_np, logits_host, logits_indices = self._views("logits_indices", num_logits)
        # Rows [end - num_sampled, end) of each sequence, in plan order (end = its last row + 1).
        first_of_seq = np.repeat(cu_np[1:num_seqs + 1] - sampled, sampled)
        logits_np[:] = first_of_seq + np.arange(num_logits) - np.repeat(np.cumsum(sampled) - sampled, sampled)

        for host, dev in ((ids_host, input_ids), (pos_host, positions), (slot_map_host, slot_mapping),
                          (logits_host, logits_indices), (q_host, query_lens_t), (ctx_host, context_lens),
                          (cu_host, cu), (slot_host, batch_slots), (table_host, table_flat)):
            dev.copy_(host, non_blocking=True)  # one copy per field, of its used rows only
        if self._copies_done is not None:
            self._copies_done.record()
        return ForwardBatch(
            input_ids=input_ids, positions=positions, slot_mapping=slot_mapping,
            block_tables=table_flat.view(padded_seqs, width), context_lens=context_lens, query_lens=query_lens_t,
            cu_seqlens_q=cu, logits_indices=logits_indices, max_query_len=max(query_lens),
            max_context_len=max_context_len, num_decode_seqs=num_decode,
            max_decode_context_len=int(context[:num_decode].max(initial=0)),
            max_prefill_context_len=int(context[num_decode:].max(initial=0)),
            num_tokens=num_tokens, num_seqs=num_seqs,
            batch_slots=batch_slots if self.constraints.is_slot_based else None)

    def _padded_sizes(self, num_seqs: int, num_tokens: int, is_decode_only: bool) -> tuple[int, int]:
        """(sequence rows, token rows) of the step: padded to the backend's buckets, if any."""
        constraints = self.constraints
        padded_seqs = bucket_for(num_seqs, constraints.decode_batch_buckets)
        if is_decode_only and constraints.decode_batch_buckets:
            return padded_seqs, padded_seqs
        return padded_seqs, bucket_for(num_tokens, constraints.prefill_token_buckets)

    def _check_fits(self, num_tokens: int, num_seqs: int, width: int) -> None:
        capacity = self.capacity
        if (num_tokens > capacity.max_num_tokens or num_seqs > capacity.max_num_seqs
                or width > capacity.max_blocks_per_seq):
            raise EngineInvariantError(f"a step of {num_tokens} tokens, {num_seqs} sequences and {width} blocks "
                                       f"per sequence is larger than the step inputs hold ({capacity})")


def step_capacity(max_step_tokens: int, max_batch_size: int | None, max_total_tokens: int, num_blocks: int,
                  block_size: int, constraints: ShapeConstraints | None = None) -> StepCapacity:
    """The largest step a scheduler with these limits plans, padded to the largest buckets.

    max_step_tokens: `max_batch_prefill_tokens`; max_batch_size: None when only tokens bound it (each
    sequence then computes at least one token and holds at least one of the `num_blocks - 1` usable
    blocks); max_total_tokens: the longest sequence (`RuntimeLimits.max_total_tokens`).
    """
    constraints = constraints or ShapeConstraints()
    max_seqs = min(max_batch_size or max_step_tokens, max_step_tokens, num_blocks - 1)
    max_padded_seqs = max(constraints.decode_batch_buckets, default=0)
    return StepCapacity(
        max_num_tokens=max(max_step_tokens, max(constraints.prefill_token_buckets, default=0), max_padded_seqs),
        max_num_seqs=max(max_seqs, max_padded_seqs),
        max_blocks_per_seq=min(-(-max_total_tokens // block_size), num_blocks - 1))
