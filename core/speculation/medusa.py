"""Medusa proposals: the guesses the heads made, in the step that sampled a sequence's last token, at that token.

The runner applies the heads (`medusa_heads.MedusaHeads`) to every sampled row of a step; after
acceptance the engine hands this proposer the guesses of the row whose token the sequence kept last
(`Proposer.take_guesses`), and the next step verifies them. Head i of that row guessed the token
i + 1 places after the kept token, so the guesses line up after it as they are. The guesses are a
deterministic function of the accepted tokens, so exact-match acceptance keeps greedy and seeded
sampled output unchanged (`acceptance.accept_matching_prefix`).
"""
from __future__ import annotations

from tgserve.core.sequence import Sequence
from tgserve.core.speculation.acceptance import Proposer
from tgserve.core.speculation.medusa_checkpoint import METHOD


class MedusaProposer(Proposer):
    """Proposes up to `num_tokens` Medusa head guesses per step (`tgserve.core.speculation.Proposer`)."""

    method = METHOD

    def __init__(self, num_tokens: int):
        """num_tokens: --speculate (at most the heads the runner computes)."""
        self.num_tokens = num_tokens

    def take_guesses(self, seq: Sequence, guesses: list[int]) -> None:
        """Keep the heads' guesses after `seq`'s last kept token (they replace the previous step's)."""
        seq.proposer_state = guesses

    def propose(self, seq: Sequence, max_tokens: int) -> list[int]:
        """The first min(num_tokens, max_tokens) guesses kept for `seq`; [] before its first sampled token."""
        guesses = seq.proposer_state
        if not isinstance(guesses, list):
            return []
        return guesses[:min(self.num_tokens, max_tokens)]
