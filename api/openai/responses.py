"""Engine results -> the OpenAI-shaped JSON TGI answers with, as plain dicts.

Finish reasons follow TGI's table exactly (TGI-CONTRACT 2.4), even where OpenAI clients expect
otherwise: `eos_token` becomes "stop" but `stop_sequence` stays "stop_sequence"; streamed
completion chunks carry `finish_reason: ""` and the last one TGI's raw reason ("eos_token").
Special tokens are left out of streamed text, so that the chunks add up to the non-streamed text.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

from tgserve.api.openai.tool_stream import ToolStream
from tgserve.api.openai.tools import ToolAnswer, new_call_id
from tgserve.api.shared.collected import CollectedGeneration
from tgserve.api.shared.errors import ApiError
from tgserve.api.shared.version import server_version
from tgserve.core.request import Finish, TokenEvent, TopToken

MIN_LOGPROB = -9999.0  # what OpenAI reports for a token with probability 0 (JSON has no -Infinity)
DONE_EVENT = b"data: [DONE]\n\n"  # the last event of every OpenAI-route stream


def openai_finish_reason(reason: str) -> str:
    """TGI's `FinishReason::format(true)`: only eos_token is renamed, to "stop"."""
    return "stop" if reason == "eos_token" else reason


def openai_logprob(value: float) -> float:
    """A finite logprob for JSON."""
    return MIN_LOGPROB if math.isnan(value) or value < MIN_LOGPROB else value


def usage_json(num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int = 0) -> dict:
    """OpenAI's `usage` object; `prompt_tokens_details.cached_tokens` counts the prompt tokens whose K/V
    came from the prefix cache (OpenAI's field; TGI has none)."""
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens,
            "prompt_tokens_details": {"cached_tokens": num_cached_tokens}}


def visible_text(event: TokenEvent) -> str:
    """A streamed token's text: empty for special tokens (TGI's chat does the same)."""
    return "" if event.special else event.text


def openai_error_event(error: ApiError) -> bytes:
    """TGI's in-stream error on OpenAI routes; `http_status_code` is always 422, as in TGI."""
    return sse_json({"error": {"message": error.message, "http_status_code": 422}})


def sse_json(body: dict) -> bytes:
    """One SSE event, framed as the native routes frame theirs (`data:` without a space)."""
    return b"data:" + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


@dataclass(slots=True, frozen=True)
class ResponseMeta:
    """What every OpenAI response object carries besides its choices."""

    model: str  # the request's `model`, or the served model id when it sent none
    system_fingerprint: str  # TGI: "{version}-{docker_label or 'native'}"
    created: int  # unix seconds

    @classmethod
    def now(cls, model: str) -> "ResponseMeta":
        """Metadata for a response created now."""
        return cls(model=model, system_fingerprint=f"{server_version()}-native", created=int(time.time()))

    def envelope(self, object_name: str) -> dict:
        """The common fields; TGI always sends an empty `id`."""
        return {"id": "", "object": object_name, "created": self.created, "model": self.model,
                "system_fingerprint": self.system_fingerprint}


def _top_logprob(token: TopToken) -> dict:
    return {"token": token.text, "logprob": openai_logprob(token.logprob)}


def chat_logprob_json(event: TokenEvent) -> dict:
    """One entry of `logprobs.content`: the token, its logprob and the alternatives asked for."""
    return {"token": event.text, "logprob": openai_logprob(event.logprob),
            "top_logprobs": [_top_logprob(t) for t in event.top_tokens]}


def chat_completion_json(meta: ResponseMeta, collected: CollectedGeneration, *, num_prompt_tokens: int,
                         is_logprobs: bool, tool_answer: ToolAnswer | None = None) -> dict:
    """A non-streamed `chat.completion`; with `tool_answer` (a request with tools) its message is a
    tool call (finish_reason "tool_calls") or that answer's text."""
    finish = collected.finish
    assert finish is not None
    logprobs = {"content": [chat_logprob_json(e) for e in collected.tokens]} if is_logprobs else None
    message = {"role": "assistant", "content": finish.text}
    finish_reason = openai_finish_reason(finish.reason)
    if tool_answer is not None:
        message = tool_answer.message(new_call_id())
        finish_reason = "tool_calls" if tool_answer.name is not None else finish_reason
    choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
    return {**meta.envelope("chat.completion"), "choices": [choice],
            "usage": usage_json(num_prompt_tokens, finish.generated_tokens, finish.cached_tokens)}


def chat_chunk_json(meta: ResponseMeta, event: TokenEvent, *, is_logprobs: bool) -> dict:
    """One streamed `chat.completion.chunk` per token; the last one carries the finish reason."""
    choice = {"index": 0, "delta": {"role": "assistant", "content": visible_text(event)},
              "logprobs": {"content": [chat_logprob_json(event)]} if is_logprobs else None,
              "finish_reason": None if event.finish is None else openai_finish_reason(event.finish.reason)}
    return {**meta.envelope("chat.completion.chunk"), "choices": [choice], "usage": None}


def tool_chunks_json(meta: ResponseMeta, stream: ToolStream, event: TokenEvent) -> list[dict]:
    """The `chat.completion.chunk`s one token of a tool answer completes (none while a name is still
    being written); the last token's carry the finish reason, "tool_calls" for a call."""
    deltas = stream.feed(visible_text(event))
    if event.finish is None:
        return [_delta_chunk(meta, delta, None) for delta in deltas]
    deltas += stream.finish()
    reason = "tool_calls" if stream.is_call else openai_finish_reason(event.finish.reason)
    deltas = deltas or [{"role": "assistant", "content": ""}]
    return [_delta_chunk(meta, delta, reason if last else None) for last, delta in _marking_last(deltas)]


def _delta_chunk(meta: ResponseMeta, delta: dict, finish_reason: str | None) -> dict:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {**meta.envelope("chat.completion.chunk"), "choices": [choice], "usage": None}


def _marking_last(items: list) -> list[tuple[bool, object]]:
    return [(index == len(items) - 1, item) for index, item in enumerate(items)]


def chat_usage_chunk_json(meta: ResponseMeta, finish: Finish, num_prompt_tokens: int) -> dict:
    """The extra chunk `stream_options.include_usage` asks for: no choices, only usage."""
    return {**meta.envelope("chat.completion.chunk"), "choices": [],
            "usage": usage_json(num_prompt_tokens, finish.generated_tokens, finish.cached_tokens)}


def completion_logprobs_json(events: list[TokenEvent], text_offset: int) -> dict:
    """OpenAI's legacy completions `logprobs`; `text_offset` is where the first token's text starts."""
    offsets = []
    for event in events:
        offsets.append(text_offset)
        text_offset += len(visible_text(event))
    return {"tokens": [e.text for e in events],
            "token_logprobs": [openai_logprob(e.logprob) for e in events],
            "top_logprobs": [{t.text: openai_logprob(t.logprob) for t in e.top_tokens} for e in events],
            "text_offset": offsets}


def completion_choice_json(index: int, text: str, logprobs: dict | None, finish_reason: str) -> dict:
    """One `text_completion` choice."""
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_json(meta: ResponseMeta, choices: list[dict], usage: dict) -> dict:
    """A non-streamed `text_completion` (all prompts' choices, summed usage)."""
    return {**meta.envelope("text_completion"), "choices": choices, "usage": usage}


def completion_chunk_json(meta: ResponseMeta, choice: dict, finish: Finish | None,
                          num_prompt_tokens: int) -> dict:
    """One streamed `text_completion` chunk; TGI's last chunk of each prompt also carries its usage."""
    body = {**meta.envelope("text_completion"), "choices": [choice]}
    if finish is not None:
        body["usage"] = usage_json(num_prompt_tokens, finish.generated_tokens, finish.cached_tokens)
    return body
