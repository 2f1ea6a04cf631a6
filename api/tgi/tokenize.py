"""POST /tokenize: the tokens a prompt becomes, with their byte offsets (`tgserve.api.shared.tokens`).

/tokenize adds the tokenizer's special tokens and applies `parameters.truncate` (keeping the last
tokens), as /generate would. /chat_tokenize is in `tgserve.api.openai.chat_tokenize`.
"""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from tgserve.api.shared.schemas import GenerateRequest
from tgserve.api.shared.state import ServerState, get_state
from tgserve.api.shared.tokens import NO_FAST_TOKENIZER, simple_tokens

router = APIRouter(tags=["Text Generation Inference"])


@router.post("/tokenize", responses=NO_FAST_TOKENIZER)
async def tokenize(body: GenerateRequest, state: ServerState = Depends(get_state)) -> Response:
    """Tokenize `inputs` as /generate would (special tokens added, `truncate` applied)."""
    tokens = await asyncio.to_thread(simple_tokens, state.engine.tokenizer, body.inputs, add_special_tokens=True,
                                     truncate=body.parameters.truncate)
    return JSONResponse(tokens)
