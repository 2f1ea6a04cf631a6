"""POST /v1/chat/completions: TGI's Messages API, run by the shared request lifecycle.

With `tools` the answer is a tool call or text (`tools.py`), streamed as tool-call deltas
(`tool_stream.py`). Request-level refusals (bad tools, images, a missing chat template, n > 1) are HTTP 422s before
anything streams. Once a stream has started, validation, overload and engine errors arrive as
`data:{"error":{"message":...,"http_status_code":422}}`, as TGI sends them, followed by
`data: [DONE]` like every OpenAI-route stream.
"""
from __future__ import annotations

from contextlib import aclosing
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from tgserve.api.openai.chat_template import render_chat
from tgserve.api.openai.params import chat_parameters, check_chat_fields
from tgserve.api.openai.responses import (DONE_EVENT, ResponseMeta, chat_chunk_json, chat_completion_json,
                                          chat_usage_chunk_json, openai_error_event, sse_json, tool_chunks_json)
from tgserve.api.openai.tool_stream import ToolStream
from tgserve.api.openai.tools import ToolPlan, new_call_id, read_answer
from tgserve.api.openai.schemas import ERROR_RESPONSES, ChatRequest
from tgserve.api.shared.errors import ApiError
from tgserve.api.shared.lifecycle import RequestLifecycle
from tgserve.api.shared.prepare import PreparedRequest, preparer
from tgserve.api.shared.schemas import GenerateRequest
from tgserve.api.shared.sse import SSEResponse, stream_headers
from tgserve.api.shared.state import ServerState, get_state
from tgserve.api.shared.tasks import cancel_on_disconnect

router = APIRouter(tags=["Text Generation Inference"])


async def chat_generate_request(state: ServerState, body: ChatRequest) -> tuple[GenerateRequest, ToolPlan | None]:
    """Check the request, render its messages (and tools) with the chat template and map its parameters;
    also returns the tools the answer may call (None: a text answer).

    Raises `ApiError` 422 for what tgserve refuses and for template errors.
    """
    tool_plan = check_chat_fields(body)
    tools = tool_plan.template_tools() if tool_plan is not None else None
    try:
        inputs = await render_chat(state.engine.tokenizer, body.messages, tools, body.tool_prompt)
    except ApiError:
        state.metrics.record_failure("template")
        raise
    return GenerateRequest(inputs=inputs, parameters=chat_parameters(body, tool_plan)), tool_plan


def response_meta(state: ServerState, requested_model: str | None) -> ResponseMeta:
    """Response metadata echoing the request's `model` (the served model id when absent)."""
    model = requested_model if requested_model is not None else state.engine.model_info.model_id
    return ResponseMeta.now(model)


@router.post("/v1/chat/completions", responses=ERROR_RESPONSES)
async def chat_completions(request: Request, body: ChatRequest, state: ServerState = Depends(get_state)) -> Response:
    """Answer a conversation with one assistant message, whole or as `chat.completion.chunk` events."""
    generate_body, tool_plan = await chat_generate_request(state, body)
    meta = response_meta(state, body.model)
    lifecycle = RequestLifecycle(state, preparer(state, generate_body, is_templated=True))
    if body.stream:
        tool_stream = ToolStream(new_call_id()) if tool_plan is not None else None
        return SSEResponse(_chat_events(lifecycle, meta, body, tool_stream),
                           headers=stream_headers(state.compute_type, len(generate_body.inputs)))
    generated = await cancel_on_disconnect(request, lifecycle.run())
    prepared = generated.prepared
    body_json = chat_completion_json(meta, generated.best, num_prompt_tokens=prepared.input_length,
                                     is_logprobs=bool(body.logprobs),
                                     tool_answer=read_answer(generated.best.finish.text) if tool_plan else None)
    headers = lifecycle.timer.headers(generated.finish, compute_type=state.compute_type,
                                      num_characters=len(generate_body.inputs), num_prompt_tokens=prepared.input_length)
    return JSONResponse(body_json, headers=headers)


async def _chat_events(lifecycle: RequestLifecycle, meta: ResponseMeta, body: ChatRequest,
                       tool_stream: ToolStream | None) -> AsyncIterator[bytes]:
    """The SSE body: one chunk per token (with tools: per tool-call delta), the usage chunk if asked
    for, then `[DONE]`."""
    is_logprobs = bool(body.logprobs)
    is_usage_asked = body.stream_options is not None and bool(body.stream_options.include_usage)
    num_prompt_tokens = 0
    async with aclosing(lifecycle.stream()) as items:
        async for item in items:
            if isinstance(item, PreparedRequest):
                num_prompt_tokens = item.input_length
            elif isinstance(item, ApiError):
                yield openai_error_event(item)
            elif tool_stream is not None:
                for chunk in tool_chunks_json(meta, tool_stream, item):
                    yield sse_json(chunk)
            else:
                yield sse_json(chat_chunk_json(meta, item, is_logprobs=is_logprobs))
                if item.finish is not None and is_usage_asked:
                    yield sse_json(chat_usage_chunk_json(meta, item.finish, num_prompt_tokens))
    yield DONE_EVENT
