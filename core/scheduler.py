"""Continuous batching: which sequences run in the next step, and how many tokens each computes.

Pure Python, no torch. Every step, running sequences go first (one decode token each, or the next
chunk of a long prompt), then waiting requests join in arrival order while the step's token budget
(`max_batch_prefill_tokens`), the batch size limit and the free KV blocks allow. Admission stops
at the first request that does not fit, so nobody is overtaken and nobody starves. A request
reserves the blocks for its whole token budget when admitted, so a running request never runs out
of cache and nothing is ever preempted; a speculating sequence's verified positions stay inside that
reservation (the engine proposes at most max_tokens - L - 1 tokens after L), so speculation needs no
extra blocks and a request near its end proposes fewer. At admission the block manager names the cached
blocks that hold a prefix of the prompt (prefix caching); the request holds them with the others it
allocates, counted once, and only the rest of its prompt is scheduled. A request whose next prompt block a
running sequence is computing right now waits for it (`_is_next_block_pending`) rather than compute it too.

A backend's `ShapeConstraints` bound every step: never more tokens than its largest prefill bucket
nor more sequences than its largest batch bucket, and on a slot-based backend each admitted request
takes one of `max_batch_size` fixed slots (`Sequence.batch_slot`) until it finishes; admission waits
while none is free.

Every block allocation goes through `schedule` (warmup and `tgserve benchmark engine` included), and
every accepted computed token through `advance`.
"""
from __future__ import annotations

import heapq
from collections import deque

from tgserve.core.block_manager import BlockManager
from tgserve.core.invariants import EngineInvariantError
from tgserve.core.sequence import Sequence, SequenceStatus
from tgserve.core.shape_constraints import ShapeConstraints
from tgserve.core.step_plan import ScheduledSequence, StepPlan


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_prefill_tokens: int,
                 max_batch_size: int | None, is_chunking_allowed: bool = True,
                 constraints: ShapeConstraints | None = None):
        constraints = constraints or ShapeConstraints()
        self.blocks = block_manager
        self.max_step_tokens = min(max_batch_prefill_tokens, max(constraints.prefill_token_buckets,
                                                                  default=max_batch_prefill_tokens))
        batch_caps = [c for c in (max_batch_size, max(constraints.decode_batch_buckets, default=None)) if c]
        self.max_batch_size = min(batch_caps, default=None)
        self.is_chunking_allowed = is_chunking_allowed
        # Free batch slots, lowest first (slot-based backends only; None: requests hold no slot).
        self._free_slots: list[int] | None = None
        if constraints.is_slot_based:
            if self.max_batch_size is None:
                raise EngineInvariantError("a slot-based backend must declare max_batch_size")
            self._free_slots = list(range(self.max_batch_size))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; it joins a step once it fits. The caller checked `can_ever_fit` (the
        engine's `submit` refuses such a request with a ValueError), so one that never fits is a bug."""
        if not self.can_ever_fit(seq.max_tokens):
            raise EngineInvariantError("request can never fit")
        self.waiting.append(seq)

    def can_ever_fit(self, max_tokens: int) -> bool:
        """Whether a request needing `max_tokens` KV slots fits in an empty cache."""
        return self.blocks.blocks_for(max_tokens) <= self.blocks.num_usable_blocks

    def schedule(self) -> StepPlan:
        """Pick the next step's sequences and token counts."""
        plan = StepPlan()
        budget = self.max_step_tokens
        for seq in self.running:
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            if num_tokens == 0:
                continue
            if num_tokens < seq.num_uncomputed_tokens and seq.num_proposed_tokens:
                self._drop_proposals(seq, seq.num_uncomputed_tokens - num_tokens)
            plan.scheduled.append(ScheduledSequence(seq, num_tokens))
            budget -= num_tokens
        while self.waiting and budget > 0 and self._has_batch_room():
            seq = self.waiting[0]
            cached_ids, cached_hashes = self._cached_prefix(seq)
            if self._is_next_block_pending(seq, len(cached_ids)):
                break
            num_computed = len(cached_ids) * self.blocks.block_size
            num_uncomputed = len(seq.token_ids) - num_computed
            num_tokens = min(num_uncomputed, budget)
            num_blocks = self.blocks.blocks_for(seq.max_tokens) - len(cached_ids)
            is_whole = num_tokens == num_uncomputed
            if not (is_whole or self.is_chunking_allowed) or not self.blocks.can_allocate(num_blocks, cached_ids):
                break
            self.waiting.popleft()
            seq.block_ids = self.blocks.reuse(cached_ids) + self.blocks.allocate(num_blocks)
            seq.block_hashes = cached_hashes
            seq.num_cached_tokens = num_computed
            if self._free_slots is not None:
                seq.batch_slot = heapq.heappop(self._free_slots)
            seq.num_computed_tokens = num_computed
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            plan.scheduled.append(ScheduledSequence(seq, num_tokens))
            budget -= num_tokens
        # Shortest queries first (stable): decodes, then verifications of a few guesses, then prompt chunks;
        # attention runs the leading short ones apart from the prefill rows.
        plan.scheduled.sort(key=lambda item: item.num_new_tokens)
        plan.max_block_id = self.blocks.max_block_id
        return plan

    @staticmethod
    def _drop_proposals(seq: Sequence, num_tokens: int) -> None:
        """Drop the last `num_tokens` proposed tokens of `seq` that do not fit the step's budget: a
        sequence's proposals are verified in the step that computes them or not at all."""
        num_dropped = min(num_tokens, seq.num_proposed_tokens)
        del seq.token_ids[len(seq.token_ids) - num_dropped:]
        seq.num_proposed_tokens -= num_dropped

    def _cached_prefix(self, seq: Sequence) -> tuple[list[int], list[bytes]]:
        """The block manager's cached blocks of `seq`'s prompt (none for a request that wants its prompt's
        logprobs: they come from computing it, as TGI turns reuse off for decoder_input_details), checked."""
        if seq.request.prefill_logprobs:
            return [], []
        block_ids, hashes = self.blocks.cached_prefix(seq.token_ids)
        if len(block_ids) != len(hashes) or len(block_ids) * self.blocks.block_size >= len(seq.token_ids):
            raise EngineInvariantError(f"{len(block_ids)} cached blocks for {len(seq.token_ids)} prompt tokens: "
                                       "not whole blocks short of the last token")
        return block_ids, hashes

    def _is_next_block_pending(self, seq: Sequence, num_cached_blocks: int) -> bool:
        """Whether a running sequence is still computing, as part of its prompt, the block of `seq`'s prompt
        that follows its cached prefix (same tokens, same everything before). Then `seq` waits for it, and
        the queue behind it (nobody is overtaken): a step or a few later that block is cached and `seq`
        reuses it instead of computing it again. Requests that arrive together with one long shared prefix
        (a system prompt, a few-shot template, `best_of` candidates) so compute it once, not once each."""
        end = (num_cached_blocks + 1) * self.blocks.block_size
        if not self.blocks.is_prefix_caching or seq.request.prefill_logprobs or end >= len(seq.token_ids):
            return False  # that block would hold the prompt's last token, which is always computed
        prefix = seq.token_ids[:end]
        return any(other.num_computed_tokens < end <= other.num_prompt_tokens and other.token_ids[:end] == prefix
                   for other in self.running)

    def advance(self, seq: Sequence, num_tokens: int) -> None:
        """Record that `num_tokens` more tokens of `seq` are computed and accepted (their K/V stay in the
        cache); blocks they filled get their content hashes. Called after every step for each sequence,
        with the step's count less any rejected proposed positions (their K/V are overwritten later)."""
        seq.num_computed_tokens += num_tokens
        self.blocks.hash_full_blocks(seq)

    def _has_batch_room(self) -> bool:
        if self._free_slots is not None and not self._free_slots:
            return False
        return self.max_batch_size is None or len(self.running) < self.max_batch_size

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or cancelled sequence at once and give its blocks back."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.blocks.free(seq.block_ids)
            if seq.batch_slot is not None:
                heapq.heappush(self._free_slots, seq.batch_slot)
                seq.batch_slot = None
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.block_ids = []
        seq.status = SequenceStatus.FINISHED
