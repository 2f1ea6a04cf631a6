"""Speculative decoding: proposers guess a decoding sequence's next tokens, the same step verifies them.

`acceptance` holds the `Proposer` interface and the acceptance rule; `ngram` the n-gram (prompt
lookup) proposer that `--speculate N` runs; `medusa_checkpoint`, `medusa_heads` and `medusa` the
heads of a Medusa checkpoint and their proposer; `make_proposer` picks the proposer for a config. The
scheduler sees only "this sequence computes 1 + k tokens this step" (`ScheduledSequence.num_sampled`);
the engine appends proposals before planning and keeps the accepted prefix plus the bonus token after.
"""
from __future__ import annotations

from tgserve.core.config import ConfigError
from tgserve.core.shape_constraints import ShapeConstraints
from tgserve.core.speculation.acceptance import Proposer
from tgserve.core.speculation.medusa import MedusaProposer
from tgserve.core.speculation.medusa_checkpoint import MedusaCheckpoint
from tgserve.core.speculation.ngram import NgramProposer


def make_proposer(speculate: int | None, constraints: ShapeConstraints | None = None,
                  backend_name: str = "this backend", medusa: MedusaCheckpoint | None = None) -> Proposer | None:
    """The proposer for `--speculate`: up to `speculate` tokens per step from the Medusa heads when the
    checkpoint has them (`medusa`), else n-gram proposals; None for 0 or unset.

    Raises ConfigError where the backend computes a running sequence one token at a time: verifying
    k guesses is a (k + 1)-token query after the cached context, the shape chunked prefill has."""
    if not speculate:
        return None
    if constraints is not None and not constraints.supports_chunked_prefill:
        raise ConfigError(f"`--speculate {speculate}` needs several tokens of a running request computed in "
                          f"one step (chunked prefill), which the {backend_name} backend does not support; "
                          "use --speculate 0")
    return MedusaProposer(speculate) if medusa is not None else NgramProposer(speculate)
