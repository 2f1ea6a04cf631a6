"""One generation request from parsed body to engine events: validate, tokenize, submit, collect.

Shared by the TGI routes (and later the OpenAI routes): they differ only in how they render the
events. Tokenization runs in a worker thread so a long prompt never stalls the event loop.
"""
from __future__ import annotations

import asyncio
from contextlib import aclosing
from dataclasses import dataclass
from typing import Awaitable, TypeVar

from starlette.requests import Request

from tgserve.api.errors import (ApiError, ClientDisconnected, generation_error, incomplete_generation_error,
                                shutting_down_error, validation_error)
from tgserve.api.metrics_requests import metered_stream
from tgserve.api.responses import CollectedGeneration
from tgserve.api.schemas import GenerateRequest
from tgserve.api.state import ServerState
from tgserve.api.timing import RequestTimer
from tgserve.api.validation import ValidationError, check_parameters, fit_input_ids
from tgserve.core.engine import EngineStopped, GenerationError
from tgserve.core.request import GenerationRequest, StoppingParams

T = TypeVar("T")
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there

# What `Engine.stream` raises: a failed step, a stopping engine, or (from `submit`) a request
# whose tokens can never fit in the KV cache.
ENGINE_ERRORS = (GenerationError, EngineStopped, ValueError)


@dataclass(slots=True)
class PreparedRequest:
    """A validated, tokenized request and what its answer needs besides the events."""

    request: GenerationRequest
    input_length: int  # prompt tokens after truncation
    prompt_prefix: str  # the prompt when return_full_text, else ""
    top_n_tokens: int
    best_of: int = 1  # candidates to run (`tgserve.api.best_of`); 1 = just `request`


async def prepare_request(state: ServerState, body: GenerateRequest, timer: RequestTimer, *,
                          add_special_tokens: bool = True) -> PreparedRequest:
    """Validate and tokenize `body`; raise `ApiError` (422) with TGI's message if it is invalid.

    add_special_tokens: False for chat-templated text, which already spells BOS and friends out
    (TGI tokenizes chat input with `add_special_tokens: false`; adding them would double BOS).
    """
    params = body.parameters
    try:
        checked = check_parameters(body.inputs, params, state.limits)
        input_ids = await _encode(state, body.inputs, add_special_tokens)
        input_ids, max_new_tokens = fit_input_ids(input_ids, checked.truncate, checked.max_new_tokens,
                                                  state.limits)
    except ValidationError as error:
        state.metrics.record_failure("validation")
        raise validation_error(error) from None
    state.metrics.record_validated(len(input_ids), max_new_tokens)
    request = GenerationRequest(
        input_ids=input_ids,
        sampling=checked.sampling,
        stopping=StoppingParams(max_new_tokens=max_new_tokens, stop_sequences=checked.stop_sequences),
        top_n_tokens=checked.top_n_tokens,
        prefill_logprobs=params.decoder_input_details and state.engine.config.enable_prefill_logprobs,
    )
    timer.mark_queued()
    return PreparedRequest(request=request, input_length=len(input_ids),
                           prompt_prefix=body.inputs if params.return_full_text else "",
                           top_n_tokens=checked.top_n_tokens, best_of=checked.best_of)


async def _encode(state: ServerState, text: str, add_special_tokens: bool) -> list[int]:
    try:
        return await asyncio.to_thread(state.engine.tokenizer.encode, text, add_special_tokens)
    except Exception as error:  # a tokenizer failure is the request's fault, as in TGI
        raise ValidationError(f"tokenizer error {error}") from None


async def collect_generation(state: ServerState, prepared: PreparedRequest, timer: RequestTimer,
                             is_metered: bool = True) -> CollectedGeneration:
    """Run the request to its end; raise `ApiError` 424 on an engine error, 500 if cut short.

    is_metered: record the outcome in the request metrics (False for extra best_of candidates).
    """
    collected = CollectedGeneration()
    events = state.engine.stream(prepared.request)
    if is_metered:
        events = metered_stream(state.metrics, events, timer)
    try:
        async with aclosing(events):
            async for event in events:
                collected.add(event)
                if event.finish is not None:
                    timer.mark_end()
                    break
    except ENGINE_ERRORS as error:
        raise engine_error(error) from None
    if collected.finish is None:
        raise incomplete_generation_error(is_stream=False)
    return collected


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client hangs up first (TGI drops such requests too).

    Cancelling `collect_generation` closes `Engine.stream`, which cancels the request in the engine.
    Raises `ClientDisconnected` in that case; nobody is left to read the answer.
    """
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})


def engine_error(error: Exception) -> ApiError:
    """The TGI error answering one of `ENGINE_ERRORS`."""
    if isinstance(error, GenerationError):
        return generation_error(str(error))
    if isinstance(error, EngineStopped):
        return shutting_down_error()
    return validation_error(str(error))
