"""Every event of one finished request, gathered for a non-streaming answer."""
from __future__ import annotations

from dataclasses import dataclass, field

from tgserve.core.request import Finish, TokenEvent, TopToken


@dataclass(slots=True)
class CollectedGeneration:
    """The token events of one request in order; `finish` is set once the last one arrived."""

    tokens: list[TokenEvent] = field(default_factory=list)
    prefill: tuple[TopToken, ...] = ()
    finish: Finish | None = None

    def add(self, event: TokenEvent) -> None:
        """Record one token event (the first may carry the prompt's logprobs)."""
        if event.prefill:
            self.prefill = event.prefill
        self.tokens.append(event)
        if event.finish is not None:
            self.finish = event.finish
