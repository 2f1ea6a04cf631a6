"""What one engine step computes, as the scheduler plans it (host side, pure Python: no torch).

The model runner turns a plan into the device-side `ForwardBatch` (`tgserve.core.forward_batch`).
The plan carries a token count per sequence, so a prefill, a chunk of a long prefill, a decode and
a speculative verification are the same kind of step; nothing downstream switches on a mode.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tgserve.core.sequence import Sequence


@dataclass(slots=True)
class ScheduledSequence:
    """One sequence's share of a step (host side, set by the scheduler)."""

    seq: Sequence
    num_new_tokens: int  # tokens computed this step, from seq.num_computed_tokens on
    # How many of this step's last positions get a sampled next token: 0 for a mid-prompt chunk, 1
    # when the step reaches the end of the known tokens, k + 1 when it verifies k proposed tokens.
    # The runner returns that many tokens for the sequence, in position order.
    num_sampled: int = field(init=False)

    def __post_init__(self) -> None:
        seq = self.seq
        is_at_end = seq.num_computed_tokens + self.num_new_tokens == len(seq.token_ids)
        self.num_sampled = seq.num_proposed_tokens + 1 if is_at_end else 0

    @property
    def is_sampling(self) -> bool:
        return self.num_sampled > 0


@dataclass(slots=True)
class StepPlan:
    """Everything the scheduler decided for one step (host side).

    Sequences come in ascending order of tokens computed (decodes first, then speculative verifications,
    then prompt chunks), so attention can split the short queries off."""

    scheduled: list[ScheduledSequence] = field(default_factory=list)
    # The highest KV block id the block manager has handed out so far (`BlockManager.max_block_id`):
    # before the step, the KV cache makes every block up to it hold finite values.
    max_block_id: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)
