"""A parsed generation body -> the engine request: validate, tokenize, fit (the lifecycle's prepare step).

Every route prepares through here: TGI's routes with the prompt as sent, the OpenAI routes with
their bodies mapped onto `GenerateRequest` (chat text already templated). Tokenization runs in a
worker thread so a long prompt never stalls the event loop.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Awaitable, Callable

from tgserve.api.shared.errors import validation_error
from tgserve.api.shared.schemas import GenerateRequest
from tgserve.api.shared.state import ServerState
from tgserve.api.shared.timing import RequestTimer
from tgserve.api.shared.validation import ValidationError, check_parameters, fit_input_ids
from tgserve.core.grammar import CompiledGrammar, GrammarError, GrammarSpec
from tgserve.core.request import GenerationRequest, StoppingParams


@dataclass(slots=True)
class PreparedRequest:
    """A validated, tokenized request and what its answer needs besides the events."""

    request: GenerationRequest
    input_length: int  # prompt tokens after truncation
    prompt_prefix: str  # the prompt when return_full_text, else ""
    top_n_tokens: int
    best_of: int = 1  # candidates to run (`tgserve.api.shared.best_of`); 1 = just `request`


Prepare = Callable[[RequestTimer], Awaitable[PreparedRequest]]  # the prepare step of one lifecycle


def preparer(state: ServerState, body: GenerateRequest, *, is_templated: bool = False) -> Prepare:
    """The prepare step of `body`: a raw prompt, or chat text that the template already rendered."""
    return lambda timer: prepare_request(state, body, timer, add_special_tokens=not is_templated)


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
        grammar = await _compile(state, checked.grammar) if checked.grammar is not None else None
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
        grammar=grammar,
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


async def _compile(state: ServerState, spec: GrammarSpec) -> CompiledGrammar:
    """The request's grammar, compiled (or found in the cache) off the event loop and the engine thread.

    TGI's 422 "grammar is not supported" under --disable-grammar-support; a grammar the engine cannot
    compile (invalid, unsupported, past the time limit) is a 422 naming the problem."""
    compiler = state.engine.grammar_compiler
    if compiler is None:
        raise ValidationError("grammar is not supported")
    try:
        return await compiler.compile_async(spec)
    except GrammarError as error:
        raise ValidationError(str(error)) from None
