"""Per-request state that follows a generation token by token: grammar matchers, proposers' caches.

The engine asks `Engine.make_request_states` for a request's states when it is submitted, keeps them
on its `Sequence.states`, and tells each state about every token the request accepts, in order, and
only those (rejected proposals and tokens cut by a stop or `max_new_tokens` are never shown).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence as Ids

if TYPE_CHECKING:
    import torch


class RequestState:
    """Base class with no-op defaults; subclasses override what they need."""

    def on_accept(self, token_id: int) -> None:
        """`token_id` was appended to the request's generated tokens (engine thread, once per token)."""

    def allowed_mask(self, proposed: Ids[int]) -> torch.Tensor | None:
        """bool [vocab]: the ids that may follow the accepted tokens and then `proposed` (ids under
        verification this step, usually empty); None allows every id. Asked by the runner once per
        sampled position of the request in every step; a mask must allow at least one id."""
        return None


def no_request_states(request) -> tuple[RequestState, ...]:
    """The default `Engine.make_request_states`: no request carries state."""
    return ()
