"""One request's life inside the engine: its tokens, its KV blocks and its progress."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tgserve.core.request import GenerationRequest


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, no KV blocks yet
    RUNNING = "running"  # holds KV blocks, computed in every step until it finishes
    FINISHED = "finished"  # done or cancelled; its blocks are back in the pool


@dataclass(slots=True, eq=False)
class Sequence:
    """Mutable per-request state, owned by the engine thread."""

    request_id: int
    request: GenerationRequest
    token_ids: list[int]  # prompt, accepted generated tokens, then this step's proposed tokens (if any)
    num_prompt_tokens: int
    max_tokens: int  # prompt + max_new_tokens: the KV slots reserved at admission
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # prompt tokens whose K/V it reused from the prefix cache at admission
    block_ids: list[int] = field(default_factory=list)
    # Content hashes of the leading blocks full of computed tokens, in order (BlockManager.hash_full_blocks).
    block_hashes: list[bytes] = field(default_factory=list)
    # The fixed batch slot it holds from admission to finish on a slot-based backend
    # (`ShapeConstraints.is_slot_based`), set by the scheduler; None elsewhere.
    batch_slot: int | None = None
    # Tokens at the end of `token_ids` that a proposer guessed and the next step verifies (set by the
    # engine before scheduling, back to 0 when the step's tokens are accepted).
    num_proposed_tokens: int = 0
    # The proposer's own per-sequence cache (e.g. the n-gram index, `tgserve.core.speculation.ngram`),
    # created by the proposer on first use; None until then. It leaves with the sequence.
    proposer_state: object = None
    states: tuple = ()  # the request's `RequestState`s, told about every accepted token
    arrival_s: float = 0.0  # time.monotonic() at submit
    first_scheduled_s: float | None = None  # when it first entered a step (end of its queue time)

    @property
    def num_generated_tokens(self) -> int:
        """Accepted generated tokens (proposed ones not counted)."""
        return len(self.token_ids) - self.num_proposed_tokens - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens
