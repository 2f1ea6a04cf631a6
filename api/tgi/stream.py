"""/generate_stream's server-sent events, with TGI's framing and TGI's in-stream errors.

TGI validates inside the stream: a validation or overload error is an HTTP 200 whose only event
is `data:{"error":...,"error_type":...}`. A client that disconnects cancels its request in the
engine: Starlette cancels the response task on `http.disconnect`, and `SSEResponse` always closes
the body generator, whose `aclosing` block closes `engine.stream`, which cancels the request.
"""
from __future__ import annotations

import logging
from contextlib import aclosing
from typing import AsyncIterator

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tgserve.api.errors import ApiError, incomplete_generation_error, overloaded_error, validation_error
from tgserve.api.generation import ENGINE_ERRORS, engine_error, prepare_request
from tgserve.api.metrics_requests import metered_stream
from tgserve.api.responses import sse_data, stream_event_json
from tgserve.api.schemas import GenerateRequest
from tgserve.api.state import ServerState
from tgserve.api.timing import RequestTimer
from tgserve.api.validation import ValidationError, check_stream_parameters

logger = logging.getLogger(__name__)


class SSEResponse(StreamingResponse):
    """A `text/event-stream` response that closes its generator however the response ends."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[union-attr]


def stream_headers(state: ServerState, body: GenerateRequest) -> dict[str, str]:
    """The headers TGI sends on streaming routes."""
    return {"x-compute-type": state.compute_type, "x-compute-characters": str(len(body.inputs)),
            "X-Accel-Buffering": "no", "Cache-Control": "no-cache"}


async def generate_stream_events(state: ServerState, body: GenerateRequest,
                                 timer: RequestTimer) -> AsyncIterator[bytes]:
    """The SSE body of /generate_stream: one event per token, or one error event."""
    try:
        check_stream_parameters(body.parameters)
    except ValidationError as error:
        state.metrics.record_request()
        state.metrics.record_failure("validation")
        yield validation_error(error).sse_event()
        return
    if not state.limiter.try_acquire():
        yield overloaded_error().sse_event()
        return
    try:
        async for chunk in _token_events(state, body, timer):
            yield chunk
    finally:
        state.limiter.release()


async def _token_events(state: ServerState, body: GenerateRequest, timer: RequestTimer) -> AsyncIterator[bytes]:
    try:
        prepared = await prepare_request(state, body, timer)
    except ApiError as error:
        yield error.sse_event()
        return
    is_finished = False
    try:
        async with aclosing(metered_stream(state.metrics, state.engine.stream(prepared.request), timer)) as events:
            async for event in events:
                yield sse_data(stream_event_json(event, prompt_prefix=prepared.prompt_prefix,
                                                 details=body.parameters.details,
                                                 input_length=prepared.input_length))
                if event.finish is not None:
                    is_finished = True
                    timer.mark_end()
                    logger.info("Success %s", timer.log_fields(event.finish))
                    break
    except ENGINE_ERRORS as error:
        yield engine_error(error).sse_event()
        return
    if not is_finished:
        yield incomplete_generation_error(is_stream=True).sse_event()
