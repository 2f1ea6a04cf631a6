"""One streamed request against a TGI-route or OpenAI-route server, timed token by token.

Each backend is a route, a request body and a parser of its server-sent events:
  tgi                 POST /generate_stream, one `data:` event per token; the last carries details
                      (generated_tokens, input_length). TGI has no ignore_eos: `--force-output-len`
                      sends max_new_tokens with `"stop": []` and records the count actually generated.
  openai-completions  POST /v1/completions, `data: [DONE]` ends the stream.
  openai-chat         POST /v1/chat/completions, the prompt as one user message.
OpenAI bodies ask for usage in the stream (`stream_options`); with vLLM's `continuous_usage_stats`
each chunk carries the running completion-token count, so a chunk holding several tokens (e.g.
speculative decoding) counts as several. `--force-output-len` adds vLLM's `ignore_eos` and `min_tokens`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable

import httpx

from tgserve.benchmark.datasets import SampleRequest
from tgserve.benchmark.metrics_serve import RequestOutput


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One parsed server-sent event."""

    num_tokens: int = 0  # tokens this event delivered (0: none, e.g. a role-only or usage-only chunk)
    error: str = ""  # an in-stream error (TGI reports validation errors this way)
    num_prompt_tokens: int | None = None  # the server's prompt token count, when it tells
    num_output_tokens: int | None = None  # the server's running / final generated token count
    text: str = ""  # the text this event delivered (special tokens left out)


@dataclass(frozen=True, slots=True)
class Backend:
    """A server route: where to POST, what to send, how to read one event."""

    path: str
    build_body: Callable[[SampleRequest, str | None, bool], dict[str, Any]]
    parse_event: Callable[[dict[str, Any], int], StreamEvent]  # (event JSON, tokens so far) -> event


def tgi_body(sample: SampleRequest, model: str | None, force_output_len: bool) -> dict[str, Any]:
    """Body of TGI's /generate_stream; greedy, details on for the token counts."""
    parameters = {"max_new_tokens": sample.num_output_tokens, "details": True, "do_sample": False}
    if force_output_len:
        parameters["stop"] = []
    return {"inputs": sample.prompt, "parameters": parameters}


def parse_tgi_event(data: dict[str, Any], num_tokens_so_far: int) -> StreamEvent:
    """A /generate_stream event: one token, maybe the final details, or an error."""
    if "error" in data:
        return StreamEvent(error=f"{data.get('error_type', 'error')}: {data['error']}")
    details = data.get("details") or {}
    token = data.get("token") or {}
    return StreamEvent(num_tokens=1 if "token" in data else 0, num_prompt_tokens=details.get("input_length"),
                       num_output_tokens=details.get("generated_tokens"),
                       text="" if token.get("special") else str(token.get("text", "")))


def _openai_common(sample: SampleRequest, model: str | None, force_output_len: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": sample.num_output_tokens, "temperature": 0.0,
                            "stream": True,
                            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    if force_output_len:
        body.update(ignore_eos=True, min_tokens=sample.num_output_tokens)
    return body


def completions_body(sample: SampleRequest, model: str | None, force_output_len: bool) -> dict[str, Any]:
    """Body of /v1/completions."""
    return {**_openai_common(sample, model, force_output_len), "prompt": sample.prompt}


def chat_body(sample: SampleRequest, model: str | None, force_output_len: bool) -> dict[str, Any]:
    """Body of /v1/chat/completions: the prompt as a single user message."""
    return {**_openai_common(sample, model, force_output_len),
            "messages": [{"role": "user", "content": sample.prompt}]}


def parse_openai_event(data: dict[str, Any], num_tokens_so_far: int) -> StreamEvent:
    """A completions or chat chunk. Tokens: the growth of usage.completion_tokens when the chunk has
    running usage, else 1 for a chunk with text; a chunk without choices only reports usage."""
    if "error" in data:
        error = data["error"]
        return StreamEvent(error=str(error.get("message", error) if isinstance(error, dict) else error))
    usage = data.get("usage") or {}
    num_prompt_tokens, num_output_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
    choices = data.get("choices") or []
    if not choices:
        return StreamEvent(num_prompt_tokens=num_prompt_tokens, num_output_tokens=num_output_tokens)
    choice = choices[0]
    delta = choice.get("delta") or {}
    text = choice.get("text") or delta.get("content") or delta.get("reasoning_content") or ""
    if num_output_tokens is not None:
        num_tokens = max(num_output_tokens - num_tokens_so_far, 0)
    else:
        num_tokens = 1 if text else 0
    return StreamEvent(num_tokens=num_tokens, num_prompt_tokens=num_prompt_tokens, num_output_tokens=num_output_tokens,
                       text=text)


BACKENDS: dict[str, Backend] = {
    "tgi": Backend("/generate_stream", tgi_body, parse_tgi_event),
    "openai-completions": Backend("/v1/completions", completions_body, parse_openai_event),
    "openai-chat": Backend("/v1/chat/completions", chat_body, parse_openai_event),
}


def sse_data(line: str) -> str | None:
    """The payload of an SSE `data:` line, or None for any other line."""
    if not line.startswith("data:"):
        return None
    return line[len("data:"):].strip()


async def send_request(client: httpx.AsyncClient, backend: Backend, base_url: str, model: str | None,
                       sample: SampleRequest, force_output_len: bool) -> RequestOutput:
    """Send one streamed request and record when each token arrived; never raises for a failed request."""
    output = RequestOutput(num_prompt_tokens=sample.num_prompt_tokens,
                           num_requested_output_tokens=sample.num_output_tokens)
    body = backend.build_body(sample, model, force_output_len)
    output.send_time_s = time.perf_counter()
    try:
        async with client.stream("POST", base_url.rstrip("/") + backend.path, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                output.error = f"HTTP {response.status_code}: {text[:300]}"
            else:
                await _read_events(response, backend, output)
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        output.error = f"{type(error).__name__}: {error}"
    output.end_time_s = time.perf_counter()
    if not output.error and not output.event_times_s:
        output.error = "the stream ended without a token"
    output.is_success = not output.error
    return output


async def _read_events(response: httpx.Response, backend: Backend, output: RequestOutput) -> None:
    """Consume the event stream into `output` (token times, counts, server-reported lengths)."""
    num_tokens_so_far = 0
    async for line in response.aiter_lines():
        payload = sse_data(line)
        if payload is None or not payload:
            continue
        now_s = time.perf_counter()
        if payload == "[DONE]":
            break
        event = backend.parse_event(json.loads(payload), num_tokens_so_far)
        if event.error:
            output.error = event.error
            return
        output.generated_text += event.text
        if event.num_tokens > 0:
            output.event_times_s.append(now_s)
            output.event_num_tokens.append(event.num_tokens)
            num_tokens_so_far += event.num_tokens
        if event.num_prompt_tokens is not None:
            output.num_prompt_tokens = event.num_prompt_tokens
        if event.num_output_tokens is not None:
            output.num_reported_output_tokens = event.num_output_tokens
            num_tokens_so_far = max(num_tokens_so_far, event.num_output_tokens)
