"""Multi-token steps: what a proposer offers for verification, and how much of a step is accepted.

A `Proposer` appends up to k guessed tokens to a decoding sequence before a step; the step then
computes the last accepted token and the k guesses, and the runner samples the target model's token
at each of those k + 1 positions (`ScheduledSequence.num_sampled`). An acceptance rule compares the
guesses with the sampled tokens and says how many sampled tokens the sequence keeps; the engine rolls
the rest back (`Engine._update`). Without a proposer every step samples one token and keeps it.
`tgserve.core.speculation.ngram` is the n-gram proposer `--speculate N` runs; Medusa heads and a draft
model implement the same `Proposer` (a draft model adds rejection sampling as its acceptance rule).
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence as Ids

from tgserve.core.sequence import Sequence

# (proposed ids of this step, sampled ids at its k + 1 positions) -> how many sampled ids to keep, >= 1.
AcceptanceRule = Callable[[Ids[int], Ids[int]], int]


class Proposer(Protocol):
    """Guesses the next tokens of decoding sequences; called on the engine thread before each step."""

    def propose(self, seq: Sequence, max_tokens: int) -> list[int]:
        """Up to `max_tokens` token ids to verify after `seq.token_ids` (its accepted tokens); [] for none.

        Called once per step for each running sequence that has exactly one uncomputed token. A proposer
        that needs per-sequence memory keeps it in `seq.proposer_state` (None until it sets it)."""


def accept_matching_prefix(proposed: Ids[int], sampled: Ids[int]) -> int:
    """Keep the proposed tokens while each equals the token sampled at the position before it, then the
    token sampled after the last kept one (the bonus token): exact for greedy and seeded rows, whose
    sampled token at a position does not depend on what follows it. With no proposals: 1."""
    num_matching = 0
    while num_matching < len(proposed) and proposed[num_matching] == sampled[num_matching]:
        num_matching += 1
    return num_matching + 1
