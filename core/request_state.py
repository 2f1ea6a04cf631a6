"""Per-request state that follows a generation token by token: grammar matchers, proposers' caches.

The engine asks `Engine.make_request_states` for a request's states when it is submitted, keeps them
on its `Sequence.states`, and tells each state about every token the request accepts, in order, and
only those (rejected proposals and tokens cut by a stop or `max_new_tokens` are never shown). A state
that sets `error` ends its request with that message (an `ErrorEvent`) before the token is emitted.

A `MaskingState` also restricts the ids a request may draw: once per step the runner hands every
masking state of the step, grouped by class, one packed int32 bitmask to fill
(`tgserve.core.token_bitmask`), so a class fills all its rows in one call; the sampler applies the
masks as one batched op. Steps and rows without a masking state pay nothing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence as Ids

if TYPE_CHECKING:
    import torch


class RequestState:
    """Base class with no-op defaults; subclasses override what they need."""

    def on_accept(self, token_id: int) -> None:
        """`token_id` was appended to the request's generated tokens (engine thread, once per token)."""

    @property
    def error(self) -> str | None:
        """Why the request cannot go on, once it cannot (the message of its `ErrorEvent`); None while it can.
        Read by the engine after every `on_accept`: a token accepted into an error is never emitted."""
        return None

    @property
    def is_complete(self) -> bool:
        """True when nothing but EOS may follow: the request then ends at EOS even with `ignore_eos_token`."""
        return False


class MaskingState(RequestState):
    """A state that allows only some ids at each sampled position of its request (e.g. a grammar)."""

    @classmethod
    def fill_allowed(cls, jobs: list[tuple[MaskingState, Ids[int], int]], bitmask: torch.Tensor) -> None:
        """Write the allowed ids of every job's rows into `bitmask`, in place.

        jobs: (state, proposed, row) for every state of this class in the step: the request's rows are
            `row .. row + len(proposed)`, row `row + j` drawing the token after its accepted tokens and
            `proposed[:j]` (ids under verification this step, usually none).
        bitmask: int32 [G, ceil(vocab / 32)] on the host, contiguous, every bit set on entry. A row a
            state leaves alone allows every id; a state whose request cannot go on sets `error`.
        Called by the runner once per step that holds states of this class (engine thread)."""
        raise NotImplementedError(f"{cls.__name__} must fill its masks")
