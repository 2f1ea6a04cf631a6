"""/generate_stream's server-sent events, with TGI's framing and TGI's in-stream errors.

TGI validates inside the stream: a validation, overload or engine error is an HTTP 200 whose only
event is `data:{"error":...,"error_type":...}`. The request runs through the shared
`RequestLifecycle.stream`; closing this body (a client that hung up) cancels it in the engine.
"""
from __future__ import annotations

from contextlib import aclosing
from typing import AsyncIterator

from tgserve.api.shared.errors import ApiError, validation_error
from tgserve.api.shared.lifecycle import RequestLifecycle
from tgserve.api.shared.prepare import PreparedRequest, preparer
from tgserve.api.shared.schemas import GenerateRequest
from tgserve.api.shared.sse import sse_data
from tgserve.api.shared.state import ServerState
from tgserve.api.shared.validation import ValidationError, check_stream_parameters
from tgserve.api.tgi.responses import stream_event_json


async def generate_stream_events(state: ServerState, body: GenerateRequest) -> AsyncIterator[bytes]:
    """The SSE body of /generate_stream: one event per token, or one error event."""
    try:
        check_stream_parameters(body.parameters)
    except ValidationError as error:
        state.metrics.record_request()
        state.metrics.record_failure("validation")
        yield validation_error(error).sse_event()
        return
    prepared: PreparedRequest | None = None
    async with aclosing(RequestLifecycle(state, preparer(state, body)).stream()) as items:
        async for item in items:
            if isinstance(item, PreparedRequest):
                prepared = item
            elif isinstance(item, ApiError):
                yield item.sse_event()
            else:
                assert prepared is not None
                yield sse_data(stream_event_json(item, prompt_prefix=prepared.prompt_prefix,
                                                 details=body.parameters.details,
                                                 input_length=prepared.input_length))
