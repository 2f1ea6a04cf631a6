"""POST /tokenize and POST /chat_tokenize: the tokens a prompt becomes, with their offsets.

As TGI, `start`/`stop` are byte offsets into the UTF-8 text and `text` is those bytes decoded
(lossily, should a token end inside a character). TGI's /chat_tokenize slices its text by
characters with those byte offsets, which goes wrong past the first non-ASCII character;
tgserve slices both routes by bytes. /tokenize adds the tokenizer's special tokens and applies
`parameters.truncate` (keeping the last tokens); /chat_tokenize tokenizes the templated text
without added special tokens, as the chat route does.
"""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from tgserve.api.errors import ApiError
from tgserve.api.openai_chat import chat_generate_request
from tgserve.api.openai_schemas import ChatRequest
from tgserve.api.schemas import ErrorResponse, GenerateRequest
from tgserve.api.state import ServerState, get_state
from tgserve.core.tokenizer import Tokenizer

router = APIRouter(tags=["Text Generation Inference"])
_NO_FAST_TOKENIZER = {404: {"model": ErrorResponse, "description": "No fast tokenizer available"}}


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


@router.post("/tokenize", responses=_NO_FAST_TOKENIZER)
async def tokenize(body: GenerateRequest, state: ServerState = Depends(get_state)) -> Response:
    """Tokenize `inputs` as /generate would (special tokens added, `truncate` applied)."""
    tokens = await asyncio.to_thread(simple_tokens, state.engine.tokenizer, body.inputs, add_special_tokens=True,
                                     truncate=body.parameters.truncate)
    return JSONResponse(tokens)


@router.post("/chat_tokenize", responses=_NO_FAST_TOKENIZER)
async def chat_tokenize(body: ChatRequest, state: ServerState = Depends(get_state)) -> Response:
    """Render a chat request with the chat template, then tokenize it as the chat route does."""
    generate_body = await chat_generate_request(state, body)
    tokens = await asyncio.to_thread(simple_tokens, state.engine.tokenizer, generate_body.inputs,
                                     add_special_tokens=False)
    return JSONResponse({"tokenize_response": tokens, "templated_text": generate_body.inputs})
