"""One constrained request's grammar, followed token by token: its masks, its end, its dead end.

A `GrammarState` holds the request's own llguidance matcher (a copy of the compiled grammar's
template; every `best_of` candidate is its own engine request, so its own matcher). The engine shows
it each accepted token; the runner asks the class once per step for the masks of all its rows, which
each matcher writes straight into the step's packed bitmask. For the rows after speculative ids under
verification it advances through the ids the grammar accepts, writes each mask and rolls back, so
only accepted tokens ever stay consumed.

The masks are computed one matcher after another on the engine thread, not on llguidance's
`LLExecutor` pool: measured on the demo model at batch 16 on a shared 2-core machine, the pool took
5.5 ms a step to fill 16 rows (and slowed the forward after it, its threads competing with torch's)
where the loop took 0.06 ms; decode steps cost 24-32 ms against 10.4-11.9 ms unconstrained with the
pool, 10.9-11.2 ms with the loop. On SmolLM2 (49k ids), per decode step: filling the masks took 0.14 ms
(1 row) / 0.21 ms (16 rows) for a JSON schema, but 0.48 / 5.2 ms for the regex `[a-z ,.]{400,}`
(llguidance's cost for a long bounded repetition), against steps of 23.5 / 43 ms.

Ends, as TGI: a grammar whose text is complete allows only EOS, so the request ends at EOS
(finish reason `eos_token`, even with `ignore_eos_token`: nothing may follow). A matcher in error
(a lexer or parser limit hit while computing a mask, or a token it refused) has no next token: the
request ends with an error event naming that, and the refused token is never emitted.
"""
from __future__ import annotations

from typing import Sequence as Ids

import torch

from tgserve.core.grammar.compiler import CompiledGrammar
from tgserve.core.request import GenerationRequest
from tgserve.core.request_state import MaskingState, RequestState

NO_NEXT_TOKEN = "the grammar allowed no next token"


class GrammarState(MaskingState):
    def __init__(self, grammar: CompiledGrammar):
        self.matcher = grammar.new_matcher()
        self.num_accepted = 0  # tokens consumed so far (the request's generated tokens)
        self._error: str | None = None

    def on_accept(self, token_id: int) -> None:
        if self._error is None and not self.matcher.consume_token(token_id):
            self._set_error()
        self.num_accepted += 1

    @property
    def error(self) -> str | None:
        return self._error

    @property
    def is_complete(self) -> bool:
        return self._error is None and self.matcher.is_stopped()

    @classmethod
    def fill_allowed(cls, jobs: list[tuple[MaskingState, Ids[int], int]], bitmask: torch.Tensor) -> None:
        """Every row of every grammar request of the step (see `MaskingState`).

        Rows after a proposed id the grammar refuses are left allowing everything: the row before
        refuses that id, so the sampled token there differs from it and verification drops the rows after."""
        assert bitmask.dtype == torch.int32 and bitmask.is_contiguous() and bitmask.device.type == "cpu"
        row_bytes = bitmask.shape[1] * bitmask.element_size()
        pointer = bitmask.data_ptr()
        for state, proposed, row in jobs:
            if state.error is None:
                state._fill_rows(proposed, pointer + row * row_bytes, row_bytes)

    def _fill_rows(self, proposed: Ids[int], pointer: int, row_bytes: int) -> None:
        """The mask now, then after each proposed id the grammar accepts; the matcher ends where it began."""
        matcher = self.matcher
        matcher.unsafe_compute_mask_ptr(pointer, row_bytes)
        num_consumed = 0
        for token_id in proposed:  # consumed one by one: a refused id leaves the matcher as it was
            if matcher.try_consume_tokens([token_id]) != 1:
                break
            num_consumed += 1
            matcher.unsafe_compute_mask_ptr(pointer + num_consumed * row_bytes, row_bytes)
        if num_consumed:
            matcher.rollback(num_consumed)
        if matcher.is_error():  # a limit hit while computing a mask
            self._set_error()

    def _set_error(self) -> None:
        reason = self.matcher.get_error().strip().splitlines()
        self._error = (f"{NO_NEXT_TOKEN} after {self.num_accepted} generated tokens"
                       + (f" ({reason[0]})" if reason and reason[0] else ""))


def grammar_request_states(request: GenerationRequest) -> tuple[RequestState, ...]:
    """A request's states: its own `GrammarState` when it carries a grammar, none otherwise."""
    if request.grammar is None:
        return ()
    return (GrammarState(request.grammar),)
