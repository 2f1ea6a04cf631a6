"""POST /v1/completions: OpenAI's legacy completions, one engine request per prompt, run concurrently.

As TGI: `suffix` and more than `--max-client-batch-size` prompts are refused before anything
runs; a stream interleaves the prompts' tokens as they arrive, each chunk with
`finish_reason: ""` except the last of each prompt, which carries TGI's raw finish reason
("eos_token", unlike the non-streamed "stop") and that prompt's usage; `data: [DONE]` ends it.
`echo` prepends the prompt; `logprobs: N` returns OpenAI's legacy logprobs object with N
alternatives per token (TGI always sends null).
"""
from __future__ import annotations

from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from tgserve.api.openai.chat import response_meta
from tgserve.api.openai.params import check_completion_fields, completion_parameters
from tgserve.api.openai.responses import (DONE_EVENT, ResponseMeta, completion_chunk_json, completion_choice_json,
                                          completion_json, completion_logprobs_json, openai_error_event,
                                          openai_finish_reason, sse_json, usage_json, visible_text)
from tgserve.api.openai.schemas import ERROR_RESPONSES, CompletionRequest
from tgserve.api.shared.errors import ApiError
from tgserve.api.shared.lifecycle import RequestLifecycle
from tgserve.api.shared.prepare import PreparedRequest, preparer
from tgserve.api.shared.schemas import GenerateRequest
from tgserve.api.shared.sse import SSEResponse, stream_headers
from tgserve.api.shared.state import ServerState, get_state
from tgserve.api.shared.tasks import cancel_on_disconnect, gather_or_cancel, merge_streams
from tgserve.core.request import TokenEvent

router = APIRouter(tags=["Text Generation Inference"])


@router.post("/v1/completions", responses=ERROR_RESPONSES)
async def completions(request: Request, body: CompletionRequest, state: ServerState = Depends(get_state)) -> Response:
    """Complete each prompt; answer with every choice at once or as `text_completion` chunks."""
    check_completion_fields(body, state.engine.config.max_client_batch_size)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    params = completion_parameters(body)
    bodies = [GenerateRequest(inputs=prompt, parameters=params) for prompt in prompts]
    meta = response_meta(state, body.model)
    lifecycles = [RequestLifecycle(state, preparer(state, b)) for b in bodies]  # one per prompt, as TGI
    if body.stream:
        headers = stream_headers(state.compute_type, sum(len(prompt) for prompt in prompts))
        return SSEResponse(_completion_events(lifecycles, bodies, meta, body), headers=headers)
    results = await cancel_on_disconnect(request, gather_or_cancel([lifecycle.run() for lifecycle in lifecycles]))
    choices, all_headers = [], []
    num_prompt_tokens = num_completion_tokens = num_cached_tokens = 0
    for index, (generated, lifecycle, prompt) in enumerate(zip(results, lifecycles, prompts)):
        prepared, finish = generated.prepared, generated.finish
        prefix = prompt if body.echo else ""
        logprobs = None if body.logprobs is None else completion_logprobs_json(generated.best.tokens, len(prefix))
        choices.append(completion_choice_json(index, prefix + finish.text, logprobs,
                                              openai_finish_reason(finish.reason)))
        num_prompt_tokens += prepared.input_length
        num_completion_tokens += finish.generated_tokens
        num_cached_tokens += finish.cached_tokens
        all_headers.append(lifecycle.timer.headers(finish, compute_type=state.compute_type, num_characters=len(prompt),
                                         num_prompt_tokens=prepared.input_length))
    body_json = completion_json(meta, choices, usage_json(num_prompt_tokens, num_completion_tokens, num_cached_tokens))
    return JSONResponse(body_json, headers=sum_headers(all_headers))


def sum_headers(all_headers: list[dict[str, str]]) -> dict[str, str]:
    """TGI's aggregated `x-*` headers: every count and time summed over the prompts."""
    merged = dict(all_headers[0])
    for headers in all_headers[1:]:
        for key, value in headers.items():
            if key == "x-compute-type":
                continue
            if key == "x-compute-time":  # seconds, a float
                merged[key] = repr(float(merged[key]) + float(value))
            else:
                merged[key] = str(int(merged[key]) + int(value))
    return merged


@dataclass(slots=True)
class _PromptProgress:
    """What the stream of one prompt has sent so far."""

    prefix: str  # the prompt when echoing, sent with the first token; then ""
    num_prompt_tokens: int = 0
    text_offset: int = 0  # characters of this choice's text sent so far (for logprobs.text_offset)


async def _completion_events(lifecycles: list[RequestLifecycle], bodies: list[GenerateRequest], meta: ResponseMeta,
                             body: CompletionRequest) -> AsyncIterator[bytes]:
    """The SSE body: the prompts' chunks interleaved, errors as OpenAI error events, then `[DONE]`."""
    progress = [_PromptProgress(prefix=b.inputs if body.echo else "") for b in bodies]
    async with aclosing(merge_streams([lifecycle.stream() for lifecycle in lifecycles])) as items:
        async for index, item in items:
            if isinstance(item, PreparedRequest):
                progress[index].num_prompt_tokens = item.input_length
            elif isinstance(item, ApiError):
                yield openai_error_event(item)
            else:
                yield sse_json(_chunk(meta, index, item, progress[index], body.logprobs is not None))
    yield DONE_EVENT


def _chunk(meta: ResponseMeta, index: int, event: TokenEvent, progress: _PromptProgress, is_logprobs: bool) -> dict:
    """One token's chunk; advances `progress`."""
    token_text = visible_text(event)
    token_offset = progress.text_offset + len(progress.prefix)
    text = progress.prefix + token_text
    progress.prefix = ""
    progress.text_offset = token_offset + len(token_text)
    logprobs = completion_logprobs_json([event], token_offset) if is_logprobs else None
    finish_reason = "" if event.finish is None else event.finish.reason  # TGI's raw reason when streaming
    return completion_chunk_json(meta, completion_choice_json(index, text, logprobs, finish_reason),
                                 event.finish, progress.num_prompt_tokens)
