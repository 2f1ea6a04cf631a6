"""The OpenAI routes, /tokenize and /chat_tokenize over raw HTTP against a real server process.

Every refusal is a 422 in TGI's envelope `{"error", "error_type"}` (never a 500); once a stream has
started, errors arrive as TGI's OpenAI error event followed by `data: [DONE]`.
"""
from __future__ import annotations

import json

import httpx
import pytest

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
CHATML_FRANCE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                 "What is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
NOT_YET = "is not supported by tgserve yet"
NO_BODY = "a message needs `content` or `tool_calls`"  # TGI and OpenAI refuse such a message too


def sse_data(client: httpx.Client, path: str, body: dict) -> list:
    """POST a streaming request; every `data:` payload, JSON-decoded except `[DONE]`."""
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        payloads = [line[len("data:"):].strip() for line in response.iter_lines() if line.startswith("data:")]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


def assert_refused(response: httpx.Response, error_type: str, message: str) -> None:
    assert response.status_code == 422, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type
    assert message in body["error"]


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
CHAT_REFUSALS = [
    ({"n": 2}, "validation", "only `n` = 1 is supported. Given: 2"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]},
     "validation", "image content parts are not supported"),
    ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tool_error", "Tool error: tools[0] must be"),
    ({"tools": [TOOL], "tool_choice": "g"}, "tool_error", "Tool error: Tool with name g not found"),
    ({"tools": [TOOL], "response_format": {"type": "json_object"}}, "tool_error",
     "Tool error: Grammar and tools are mutually exclusive"),
    ({"tools": [TOOL, TOOL]}, "tool_error", "two tools have the same function name"),
    ({"tool_choice": "required"}, "tool_error", "Tool error: `tool_choice` 'required' needs `tools`"),
    ({"tool_choice": 5}, "tool_error", "`tool_choice` must be a string or an object"),
    ({"response_format": {"type": "xml"}}, "validation", "unknown `response_format` type 'xml'"),
    ({"response_format": {"type": "json_schema"}}, "validation", "needs `json_schema`"),
    ({"response_format": "json"}, "validation", "`response_format` must be an object with a `type`"),
    ({"presence_penalty": 0.5}, "validation", f"a non-zero `presence_penalty` {NOT_YET}"),
    ({"presence_penalty": 2.5}, "validation", "`presence_penalty` must be >= -2.0 and <= 2.0"),
    ({"logit_bias": {"42": 1.0}}, "validation", f"`logit_bias` {NOT_YET}"),
    ({"top_p": 1.5}, "validation", "`top_p` must be > 0.0 and <= 1.0"),
    ({"temperature": -1.0}, "validation", "`temperature` must be strictly positive"),
    ({"frequency_penalty": 3.0}, "validation", "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"max_tokens": 0}, "validation", "`max_new_tokens` must be strictly positive"),
    ({"logprobs": True, "top_logprobs": 6}, "validation", "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "validation", "`stop` supports up to 4 stop sequences. Given: 5"),
    ({"messages": []}, "validation", "messages: List should have at least 1 item"),
    ({"messages": "hello"}, "validation", "Failed to deserialize the JSON body"),
    ({"messages": [{"role": "user"}]}, "validation", f"messages.0: Value error, {NO_BODY}"),
    ({"messages": [{"role": "user", "content": None}]}, "validation", NO_BODY),
    ({"messages": [*FRANCE, {"role": "assistant"}]}, "validation", f"messages.1: Value error, {NO_BODY}"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "validation", "Failed to deserialize"),
]


@pytest.mark.parametrize(("fields", "error_type", "message"), CHAT_REFUSALS, ids=lambda v: str(v)[:40])
def test_chat_refusals(client, fields, error_type, message):
    assert_refused(client.post("/v1/chat/completions", json={"messages": FRANCE, "max_tokens": 5, **fields}),
                   error_type, message)


COMPLETION_REFUSALS = [
    ({"suffix": "b"}, "suffix not supported",
     "Suffix is not supported and can be achieved by preprocessing the prompt."),
    ({"prompt": ["a", "b", "c", "d", "e"]}, "batch size exceeded",
     "Number of prompts exceeds the maximum allowed batch size of 4"),
    ({"prompt": []}, "validation", "`prompt` cannot be an empty list"),
    ({"prompt": ""}, "validation", "`inputs` cannot be empty"),
    ({"prompt": [[1, 2, 3]]}, "validation", "Failed to deserialize the JSON body"),
    ({"n": 3}, "validation", "only `n` = 1 is supported"),
    ({"best_of": 2}, "validation", "only `best_of` = 1 is supported"),
    ({"echo": True, "logprobs": 1}, "validation", f"`echo` with `logprobs` (prompt logprobs) {NOT_YET}"),
    ({"logprobs": 9}, "validation", "`top_n_tokens` must be >= 0 and <= 5. Given: 9"),
    ({"repetition_penalty": 0.0}, "validation", "`repetition_penalty` must be strictly positive"),
]


@pytest.mark.parametrize(("fields", "error_type", "message"), COMPLETION_REFUSALS, ids=lambda v: str(v)[:40])
def test_completion_refusals(client, fields, error_type, message):
    assert_refused(client.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 5, **fields}),
                   error_type, message)


def test_stream_errors_are_events_after_the_request_checks(client):
    error_event = {"error": {"message": "Input validation error: `top_p` must be > 0.0 and <= 1.0",
                             "http_status_code": 422}}
    chat = {"messages": FRANCE, "max_tokens": 5, "stream": True}
    assert sse_data(client, "/v1/chat/completions", {**chat, "top_p": 1.5}) == [error_event, "[DONE]"]
    completion = {"prompt": ["a", "b"], "max_tokens": 5, "stream": True, "top_p": 1.5}
    assert sse_data(client, "/v1/completions", completion) == [error_event, error_event, "[DONE]"]
    # What the request itself asks for is refused before the stream starts, as TGI does.
    assert_refused(client.post("/v1/chat/completions", json={**chat, "n": 2}), "validation", "only `n` = 1")
    assert_refused(client.post("/v1/completions", json={**completion, "suffix": "x"}), "suffix not supported", "")


def test_top_p_one_and_any_model_name_are_accepted(client):
    response = client.post("/v1/chat/completions", json={"messages": FRANCE, "max_tokens": 2, "top_p": 1.0,
                                                          "temperature": 1.0, "model": "gpt-4o", "n": 1})
    assert response.status_code == 200 and response.json()["model"] == "gpt-4o"
    assert "x-compute-time" in response.headers and response.headers["x-generated-tokens"] == "2"


def test_chat_stream_shape(client):
    events = sse_data(client, "/v1/chat/completions", {"messages": FRANCE, "temperature": 0, "max_tokens": 3,
                                                       "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]" and len(events) == 5
    first, usage = events[0], events[3]
    assert set(first) == {"id", "object", "created", "model", "system_fingerprint", "choices", "usage"}
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": "The"},
                                 "logprobs": None, "finish_reason": None}]
    assert first["usage"] is None and first["object"] == "chat.completion.chunk"
    assert events[2]["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3


def test_models_tokenize_and_chat_tokenize(client, model_dir, hf_tokenizer):
    model_id = str(model_dir)
    assert client.get("/v1/models").json() == {
        "object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": model_id}]}
    text = "Héllo <|im_end|> 😀"
    tokens = client.post("/tokenize", json={"inputs": text}).json()
    data = text.encode()
    assert all(t["text"] == data[t["start"]:t["stop"]].decode(errors="replace") for t in tokens)
    im_end = hf_tokenizer.convert_tokens_to_ids("<|im_end|>")  # the id from transformers' tokenizer
    start = data.index(b"<|im_end|>")  # byte offsets, as TGI: "é" is two bytes
    assert {"id": im_end, "text": "<|im_end|>", "start": start, "stop": start + len(b"<|im_end|>")} in tokens
    truncated = client.post("/tokenize", json={"inputs": text, "parameters": {"truncate": 2}}).json()
    assert truncated == tokens[-2:]
    chat = client.post("/chat_tokenize", json={"messages": FRANCE}).json()
    assert chat["templated_text"] == CHATML_FRANCE
    assert chat["tokenize_response"] == client.post("/tokenize", json={"inputs": CHATML_FRANCE}).json()
    assert_refused(client.post("/chat_tokenize", json={"messages": FRANCE, "tools": [{"type": "function"}]}),
                   "tool_error", "Tool error: tools[0] must be")
    with_tools = client.post("/chat_tokenize", json={"messages": FRANCE, "tools": [TOOL]}).json()["templated_text"]
    assert f"\n---\n{json.dumps([TOOL])}\n" in with_tools  # the demo template reads no `tools`: the prompt lists them
