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

from typing import Callable, Sequence as Ids

from tgserve.core.sequence import Sequence

# (proposed ids of this step, sampled ids at its k + 1 positions) -> how many sampled ids to keep, >= 1.
AcceptanceRule = Callable[[Ids[int], Ids[int]], int]


class Proposer:
    """Guesses the next tokens of decoding sequences; called on the engine thread before each step.

    A proposer implements `propose` (one sequence at a time) or, where guessing is a batched
    computation (a draft model's forward), `propose_batch`. `observe` hears how each verification
    went (adaptive lengths, a draft's own cache). A proposer that needs per-sequence memory keeps it
    in `seq.proposer_state` (None until it sets it)."""

    method = "custom"  # the name TGI's start-up line logs ("Using speculation {method} with N input ids.")
    num_tokens = 0  # the most tokens it proposes per step (--speculate)

    def propose(self, seq: Sequence, max_tokens: int) -> list[int]:
        """Up to `max_tokens` token ids to verify after `seq.token_ids` (its accepted tokens); [] for none."""
        raise NotImplementedError

    def propose_batch(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        """Guesses for each of `seqs` (running, exactly one uncomputed token each), at most `limits[i]`
        (>= 1) for `seqs[i]`, in order. The default asks `propose` for each sequence."""
        return [self.propose(seq, limit) for seq, limit in zip(seqs, limits)]

    def observe(self, seq: Sequence, num_proposed: int, num_accepted: int) -> None:
        """After a step verified `num_proposed` (>= 1) guesses of `seq`: `num_accepted` sampled tokens
        were kept (1 to num_proposed + 1; the guesses matched num_accepted - 1 of them)."""

    def observe_step(self, num_rows: int, step_s: float) -> None:
        """After each step that computed no prompt tokens: its rows (decodes plus verified guesses) and
        the seconds its forward took, sampling included. The default ignores them."""

    def take_guesses(self, seq: Sequence, guesses: list[int]) -> None:
        """After every step that sampled for `seq` while the runner computes guesses of its own
        (`StepOutput.head_ids`, Medusa heads): the guesses at the tokens after its last kept one, in
        order. Called after `observe`; the default ignores them."""


def accept_matching_prefix(proposed: Ids[int], sampled: Ids[int]) -> int:
    """Keep the proposed tokens while each equals the token sampled at the position before it, then the
    token sampled after the last kept one (the bonus token): exact for greedy and seeded rows, whose
    sampled token at a position does not depend on what follows it. With no proposals: 1."""
    num_matching = 0
    while num_matching < len(proposed) and proposed[num_matching] == sampled[num_matching]:
        num_matching += 1
    return num_matching + 1
