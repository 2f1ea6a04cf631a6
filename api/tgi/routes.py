"""TGI's generation routes: POST /generate, POST /generate_stream and POST / (compat)."""
from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from tgserve.api.best_of import collect_best_of
from tgserve.api.errors import overloaded_error
from tgserve.api.generation import cancel_on_disconnect, prepare_request
from tgserve.api.responses import generate_response_json
from tgserve.api.schemas import CompatGenerateRequest, ErrorResponse, GenerateRequest, GenerateResponse, StreamResponse
from tgserve.api.state import ServerState, get_state
from tgserve.api.streaming import SSEResponse, generate_stream_events, stream_headers
from tgserve.api.timing import RequestTimer

logger = logging.getLogger(__name__)
router = APIRouter(tags=["Text Generation Inference"])

_ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in (
    (422, "Input validation error"), (424, "Generation Error"), (429, "Model is overloaded"),
    (500, "Incomplete generation"))}


@router.post("/generate", response_model=GenerateResponse, responses=_ERRORS)
async def generate(request: Request, body: GenerateRequest, state: ServerState = Depends(get_state)) -> Response:
    """Generate tokens; answer with the whole text (and `details` when asked)."""
    body_json, headers = await _generate(state, body, request)
    return JSONResponse(body_json, headers=headers)


@router.post("/generate_stream", responses={200: {"model": StreamResponse, "content": {"text/event-stream": {}}}})
async def generate_stream(body: GenerateRequest, state: ServerState = Depends(get_state)) -> Response:
    """Generate tokens as server-sent events; errors arrive as an event in an HTTP 200 (TGI)."""
    return _stream(state, body)


@router.post("/", responses={200: {"model": list[GenerateResponse]}, **_ERRORS})
async def compat_generate(request: Request, body: CompatGenerateRequest,
                          state: ServerState = Depends(get_state)) -> Response:
    """The Inference-API-compatible route: /generate wrapped in a list, or /generate_stream."""
    if body.parameters.return_full_text is None:
        body.parameters.return_full_text = state.default_return_full_text
    if body.stream:
        return _stream(state, body)
    body_json, headers = await _generate(state, body, request)
    return JSONResponse([body_json], headers=headers)


async def _generate(state: ServerState, body: GenerateRequest, request: Request) -> tuple[dict, dict[str, str]]:
    """Run one non-streaming request under a concurrency permit; return (body, headers)."""
    timer = RequestTimer()
    if not state.limiter.try_acquire():
        raise overloaded_error()
    try:
        prepared = await prepare_request(state, body, timer)
        collected, others = await cancel_on_disconnect(request, collect_best_of(state, prepared, timer))
    finally:
        state.limiter.release()
    finish = collected.finish
    assert finish is not None
    params = body.parameters
    body_json = generate_response_json(collected, prompt_prefix=prepared.prompt_prefix,
                                       details=params.details or params.decoder_input_details,
                                       top_n_tokens=prepared.top_n_tokens, best_of_sequences=others)
    headers = timer.headers(finish, compute_type=state.compute_type, num_characters=len(body.inputs),
                            num_prompt_tokens=prepared.input_length)
    logger.info("Success %s", timer.log_fields(finish))
    return body_json, headers


def _stream(state: ServerState, body: GenerateRequest) -> Response:
    timer = RequestTimer()
    return SSEResponse(generate_stream_events(state, body, timer), headers=stream_headers(state, body))
