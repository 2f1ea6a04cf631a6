"""One constrained request's grammar, followed token by token: its masks, its end, its dead end.

A `GrammarState` holds the request's own llguidance matcher (a copy of the compiled grammar's
template; every `best_of` candidate is its own engine request, so its own matcher). The engine shows
it each accepted token; the runner asks the class once per step for the masks of all its rows, which
llguidance's executor computes in one call, off the GIL, straight into the step's packed bitmask:
for a row after speculative ids under verification it advances the matcher through them, writes the
mask and rolls back, so only accepted tokens ever stay consumed.

Ends, as TGI: a grammar whose text is complete allows only EOS, so the request ends at EOS
(finish reason `eos_token`, even with `ignore_eos_token`: nothing may follow). A matcher in error
(a lexer or parser limit hit while computing a mask, or a token it refused) has no next token: the
request ends with an error event naming that, and the refused token is never emitted.
"""
from __future__ import annotations

from typing import Sequence as Ids

import llguidance
import torch

from tgserve.core.grammar.compiler import CompiledGrammar
from tgserve.core.request import GenerationRequest
from tgserve.core.request_state import MaskingState, RequestState

NO_NEXT_TOKEN = "the grammar allowed no next token"


class GrammarState(MaskingState):
    def __init__(self, grammar: CompiledGrammar, executor: llguidance.LLExecutor):
        """grammar: the request's compiled grammar; executor: the server's llguidance worker pool
        (`GrammarCompiler.executor`), shared by every request."""
        self.matcher = grammar.new_matcher()
        self.executor = executor
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
        """All rows of every grammar request of the step in one executor call (see `MaskingState`).

        Rows after a proposed id the grammar refuses are left allowing everything: the row before
        refuses that id, so the sampled token there differs from it and verification drops the rows after."""
        assert bitmask.dtype == torch.int32 and bitmask.is_contiguous() and bitmask.device.type == "cpu"
        live = [(state.matcher, row, list(proposed)) for state, proposed, row in jobs if state.error is None]
        executor, pointer = jobs[0][0].executor, bitmask.data_ptr()
        row_bytes, num_rows = bitmask.shape[1] * bitmask.element_size(), bitmask.shape[0]
        plain = [(matcher, row) for matcher, row, proposed in live if not proposed]
        verifying = [job for job in live if job[2]]  # the library takes no empty draft lists
        if plain:
            executor.unsafe_compute_mask_ptr(plain, pointer, row_bytes, num_rows)
        if verifying:
            executor.unsafe_compute_mask_ptr_with_draft_token(verifying, pointer, row_bytes, num_rows)
        for state, _, _ in jobs:
            if state.error is None and state.matcher.is_error():  # a limit hit while computing the mask
                state._set_error()

    def _set_error(self) -> None:
        reason = self.matcher.get_error().strip().splitlines()
        self._error = (f"{NO_NEXT_TOKEN} after {self.num_accepted} generated tokens"
                       + (f" ({reason[0]})" if reason and reason[0] else ""))


def grammar_request_states(request: GenerationRequest, executor: llguidance.LLExecutor) -> tuple[RequestState, ...]:
    """A request's states: its own `GrammarState` when it carries a grammar, none otherwise."""
    if request.grammar is None:
        return ()
    return (GrammarState(request.grammar, executor),)
