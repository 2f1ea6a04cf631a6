"""TGI's generation routes: POST /generate, POST /generate_stream and POST / (compat)."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from tgserve.api.shared.lifecycle import RequestLifecycle
from tgserve.api.shared.prepare import preparer
from tgserve.api.shared.schemas import ErrorResponse, GenerateRequest
from tgserve.api.shared.sse import SSEResponse, stream_headers
from tgserve.api.shared.state import ServerState, get_state
from tgserve.api.shared.tasks import cancel_on_disconnect
from tgserve.api.tgi.responses import generate_response_json
from tgserve.api.tgi.schemas import CompatGenerateRequest, GenerateResponse, StreamResponse
from tgserve.api.tgi.stream import generate_stream_events

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
    """Run one non-streaming request (its best_of candidates too); return (body, headers)."""
    lifecycle = RequestLifecycle(state, preparer(state, body))
    generated = await cancel_on_disconnect(request, lifecycle.run())
    prepared, params = generated.prepared, body.parameters
    body_json = generate_response_json(generated.best, prompt_prefix=prepared.prompt_prefix,
                                       details=params.details or params.decoder_input_details,
                                       top_n_tokens=prepared.top_n_tokens, best_of_sequences=generated.others)
    headers = lifecycle.timer.headers(generated.finish, compute_type=state.compute_type,
                                      num_characters=len(body.inputs), num_prompt_tokens=prepared.input_length)
    return body_json, headers


def _stream(state: ServerState, body: GenerateRequest) -> Response:
    return SSEResponse(generate_stream_events(state, body),
                       headers=stream_headers(state.compute_type, len(body.inputs)))
