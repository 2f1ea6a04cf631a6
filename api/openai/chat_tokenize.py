"""POST /chat_tokenize: a chat request rendered with the chat template, then tokenized.

TGI's route beside the Messages API: the templated text is tokenized without added special
tokens, as the chat route does, with the byte offsets of `tgserve.api.shared.tokens`.
"""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from tgserve.api.openai.chat import chat_generate_request
from tgserve.api.openai.schemas import ChatRequest
from tgserve.api.shared.state import ServerState, get_state
from tgserve.api.shared.tokens import NO_FAST_TOKENIZER, simple_tokens

router = APIRouter(tags=["Text Generation Inference"])


@router.post("/chat_tokenize", responses=NO_FAST_TOKENIZER)
async def chat_tokenize(body: ChatRequest, state: ServerState = Depends(get_state)) -> Response:
    """Render a chat request with the chat template, then tokenize it as the chat route does."""
    generate_body, _tool_plan = await chat_generate_request(state, body)
    tokens = await asyncio.to_thread(simple_tokens, state.engine.tokenizer, generate_body.inputs,
                                     add_special_tokens=False)
    return JSONResponse({"tokenize_response": tokens, "templated_text": generate_body.inputs})
