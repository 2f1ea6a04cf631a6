"""The tokens a text becomes, with TGI's byte offsets: the body of /tokenize and /chat_tokenize.

As TGI, `start`/`stop` are byte offsets into the UTF-8 text and `text` is those bytes decoded
(lossily, should a token end inside a character). TGI's /chat_tokenize slices its text by
characters with those byte offsets, which goes wrong past the first non-ASCII character;
tgserve slices both routes by bytes.
"""
from __future__ import annotations

from tgserve.api.shared.errors import ApiError
from tgserve.api.shared.schemas import ErrorResponse
from tgserve.core.tokenizer import Tokenizer

NO_FAST_TOKENIZER = {404: {"model": ErrorResponse, "description": "No fast tokenizer available"}}


def simple_tokens(tokenizer: Tokenizer, text: str, *, add_special_tokens: bool,
                  truncate: int | None = None) -> list[dict]:
    """TGI's `[{id, text, start, stop}]` for `text`; raises `ApiError` 404 without a fast tokenizer."""
    if not tokenizer.hf.is_fast:
        raise ApiError(404, "no fast tokenizer", "No fast tokenizer available")
    encoding = tokenizer.hf(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids, char_offsets = encoding["input_ids"], encoding["offset_mapping"]
    if truncate is not None and len(ids) > truncate:  # TGI truncates from the left
        ids, char_offsets = ids[len(ids) - truncate:], char_offsets[len(ids) - truncate:]
    byte_starts = _byte_starts(text)
    data = text.encode()
    tokens = []
    for token_id, (char_start, char_stop) in zip(ids, char_offsets):
        start, stop = byte_starts[char_start], byte_starts[char_stop]
        tokens.append({"id": token_id, "text": data[start:stop].decode(errors="replace"), "start": start, "stop": stop})
    return tokens


def _byte_starts(text: str) -> list[int]:
    """Byte offset of every character index of `text`, plus its end: `[len(text) + 1]`."""
    starts = [0]
    for char in text:
        starts.append(starts[-1] + len(char.encode()))
    return starts
