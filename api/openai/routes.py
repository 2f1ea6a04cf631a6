"""The OpenAI-compatible routes as one router: chat completions, completions,
POST /chat_tokenize and GET /v1/models."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from tgserve.api.openai import chat, chat_tokenize, completions
from tgserve.api.shared.state import ServerState, get_state

router = APIRouter(tags=["Text Generation Inference"])
router.include_router(chat.router)
router.include_router(completions.router)
router.include_router(chat_tokenize.router)


def models_json(model_id: str) -> dict:
    """TGI's GET /v1/models body: the one served model, owned by itself, `created` unknown (0)."""
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": model_id}]}


@router.get("/v1/models")
async def openai_models(state: ServerState = Depends(get_state)) -> Response:
    """The served model, in OpenAI's model-list shape."""
    return JSONResponse(models_json(state.engine.model_info.model_id))
