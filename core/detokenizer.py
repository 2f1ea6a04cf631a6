"""Incremental detokenization that never splits a UTF-8 character (TGI's prefix/read offsets).

A byte-level BPE token can hold half of a multi-byte character; decoding it alone gives U+FFFD.
We decode a short window of recent tokens twice (with and without the new ones) and only emit the
difference once it no longer ends in U+FFFD. When the request ends on an incomplete character,
`final_text` flushes what is left (ending in U+FFFD, as the tokenizer decodes it), so the token texts
always add up to `tokenizer.decode` of the generated ids. (TGI withholds that tail from the last
token's text but keeps it in `generated_text`, so there the stream and the final text disagree.)
"""
from __future__ import annotations

from dataclasses import dataclass

from tgserve.core.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


@dataclass(slots=True)
class DetokenizerState:
    """Offsets into a sequence's generated ids; one per request."""

    prefix_offset: int = 0  # start of the context window already emitted
    read_offset: int = 0  # first id not yet emitted


def next_text(tokenizer: Tokenizer, ids: list[int], state: DetokenizerState) -> str:
    """Text that the ids past `state.read_offset` add, or "" while a character is incomplete."""
    prefix = tokenizer.decode(ids[state.prefix_offset:state.read_offset], skip_special_tokens=False)
    full = tokenizer.decode(ids[state.prefix_offset:], skip_special_tokens=False)
    if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
        state.prefix_offset = state.read_offset
        state.read_offset = len(ids)
        return full[len(prefix):]
    return ""


def final_text(tokenizer: Tokenizer, ids: list[int], state: DetokenizerState) -> str:
    """The text of the ids `next_text` still holds back (an incomplete last character), for the last token."""
    if state.read_offset >= len(ids):
        return ""
    prefix = tokenizer.decode(ids[state.prefix_offset:state.read_offset], skip_special_tokens=False)
    full = tokenizer.decode(ids[state.prefix_offset:], skip_special_tokens=False)
    state.prefix_offset = state.read_offset
    state.read_offset = len(ids)
    return full[len(prefix):]
