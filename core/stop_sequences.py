"""Stop-sequence matching over text that arrives a piece at a time, for stops of any length.

A stop matches wherever it occurs in the generated text (not the prompt), also when it starts or
ends inside a token's text; the request stops at the first token whose text completes one. Only a
stop that ends in the newest piece can be new, and such a stop starts at most `len(stop) - 1`
characters before that piece, so each request keeps exactly that many characters of earlier text:
the window grows with the request's longest stop instead of capping it. (TGI keeps a fixed tail of
200-300 characters and anchors the match at the end of the text, so a longer stop, or one that
ends inside a token, never matches there.)
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class StopMatcher:
    """One request's stop sequences and the generated text a new match could still start in."""

    stop_sequences: tuple[str, ...]  # as the request gave them ("" matches at once, as TGI's `$` regex does)
    tail: str = ""  # the last `max_tail_chars` characters of the text fed so far
    max_tail_chars: int = field(init=False)  # longest stop minus one, in characters

    def __post_init__(self) -> None:
        self.max_tail_chars = max((len(stop) - 1 for stop in self.stop_sequences), default=0)

    def feed(self, text: str) -> bool:
        """Append newly generated `text`; True when a stop sequence now occurs in the text."""
        if not self.stop_sequences:
            return False
        window = self.tail + text
        if any(stop in window for stop in self.stop_sequences):
            return True
        self.tail = window[-self.max_tail_chars:] if self.max_tail_chars > 0 else ""
        return False
