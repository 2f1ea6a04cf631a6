"""Speculative decoding: proposers guess a decoding sequence's next tokens, the same step verifies them.

`acceptance` holds the `Proposer` interface and the acceptance rule; `ngram` the n-gram (prompt
lookup) proposer that `--speculate N` runs; `make_proposer` picks the proposer for a config. The
scheduler sees only "this sequence computes 1 + k tokens this step" (`ScheduledSequence.num_sampled`);
the engine appends proposals before planning and keeps the accepted prefix plus the bonus token after.
"""
from __future__ import annotations

from tgserve.core.speculation.acceptance import Proposer
from tgserve.core.speculation.ngram import NgramProposer


def make_proposer(speculate: int | None) -> Proposer | None:
    """The proposer for `--speculate`: n-gram proposals of up to `speculate` tokens; None for 0 or unset."""
    if not speculate:
        return None
    return NgramProposer(speculate)
