"""The serving benchmark's routes: request bodies, event parsing, and whole streams over a mock transport."""
from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest

from tgserve.benchmark.datasets import SampleRequest
from tgserve.benchmark.serve import ServeBenchConfig, run_rate
from tgserve.benchmark.serve_backends import BACKENDS, parse_openai_event, parse_tgi_event, send_request, sse_data

SAMPLE = SampleRequest("Hello there", num_prompt_tokens=3, num_output_tokens=4)


def sse(*events: object, done: bool = False) -> bytes:
    lines = [f"data:{json.dumps(event)}\n\n" for event in events] + (["data: [DONE]\n\n"] if done else [])
    return "".join(lines).encode()


def tgi_token(index: int, details: dict | None = None) -> dict:
    return {"index": index, "token": {"id": index, "text": f" t{index}", "logprob": -0.1, "special": False},
            "generated_text": None if details is None else "text", "details": details}


def run_one(backend: str, body: bytes, status_code: int = 200, seen: list | None = None):
    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append((request.url.path, json.loads(request.content)))
        return httpx.Response(status_code, content=body, headers={"content-type": "text/event-stream"})

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await send_request(client, BACKENDS[backend], "http://server/", "m", SAMPLE, True)

    return asyncio.run(go())


def test_bodies_force_output_length_per_route():
    tgi = BACKENDS["tgi"].build_body(SAMPLE, None, True)
    assert tgi == {"inputs": "Hello there",
                   "parameters": {"max_new_tokens": 4, "details": True, "do_sample": False, "stop": []}}
    assert "stop" not in BACKENDS["tgi"].build_body(SAMPLE, None, False)["parameters"]
    completions = BACKENDS["openai-completions"].build_body(SAMPLE, "m", True)
    assert completions["prompt"] == "Hello there" and completions["model"] == "m"
    assert (completions["max_tokens"], completions["ignore_eos"], completions["min_tokens"]) == (4, True, 4)
    assert completions["stream"] is True and completions["stream_options"]["include_usage"] is True
    chat = BACKENDS["openai-chat"].build_body(SAMPLE, "m", False)
    assert chat["messages"] == [{"role": "user", "content": "Hello there"}]
    assert "ignore_eos" not in chat and "min_tokens" not in chat


def test_event_parsers():
    assert sse_data("data: {}") == "{}" and sse_data("data:[DONE]") == "[DONE]" and sse_data(": ping") is None
    last = parse_tgi_event(tgi_token(3, {"finish_reason": "length", "generated_tokens": 3, "input_length": 9}), 2)
    assert (last.num_tokens, last.num_prompt_tokens, last.num_output_tokens) == (1, 9, 3)
    assert parse_tgi_event({"error": "too long", "error_type": "validation"}, 0).error == "validation: too long"
    chunk = {"choices": [{"index": 0, "text": " a"}], "usage": {"prompt_tokens": 5, "completion_tokens": 4}}
    assert parse_openai_event(chunk, 1).num_tokens == 3  # running usage: a chunk of three tokens
    assert parse_openai_event({"choices": [{"delta": {"role": "assistant", "content": ""}}]}, 0).num_tokens == 0
    assert parse_openai_event({"choices": [{"delta": {"content": "x"}}]}, 0).num_tokens == 1
    usage_only = parse_openai_event({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7}}, 7)
    assert (usage_only.num_tokens, usage_only.num_output_tokens) == (0, 7)
    assert parse_openai_event({"error": {"message": "bad model"}}, 0).error == "bad model"


def test_tgi_stream():
    details = {"finish_reason": "length", "generated_tokens": 3, "seed": None, "input_length": 9}
    seen: list = []
    output = run_one("tgi", sse(tgi_token(1), tgi_token(2), tgi_token(3, details)), seen=seen)
    assert seen[0][0] == "/generate_stream"
    assert output.is_success and output.error == ""
    assert output.event_num_tokens == [1, 1, 1]
    assert (output.num_prompt_tokens, output.num_output_tokens, output.num_requested_output_tokens) == (9, 3, 4)
    assert output.send_time_s <= output.event_times_s[0] <= output.event_times_s[-1] <= output.end_time_s


def test_openai_completions_stream_with_running_usage():
    chunks = [{"choices": [{"text": " a"}], "usage": {"prompt_tokens": 6, "completion_tokens": 1}},
              {"choices": [{"text": " b c"}], "usage": {"prompt_tokens": 6, "completion_tokens": 3}},
              {"choices": [], "usage": {"prompt_tokens": 6, "completion_tokens": 3}}]
    output = run_one("openai-completions", sse(*chunks, done=True))
    assert output.is_success
    assert output.event_num_tokens == [1, 2]
    assert (output.num_prompt_tokens, output.num_output_tokens) == (6, 3)


def test_openai_chat_stream_with_final_usage_only():
    chunks = [{"choices": [{"delta": {"role": "assistant", "content": ""}}]},
              {"choices": [{"delta": {"content": "Hi"}}]}, {"choices": [{"delta": {"content": "!"}}]},
              {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 2}}]
    seen: list = []
    output = run_one("openai-chat", sse(*chunks, done=True), seen=seen)
    assert seen[0][0] == "/v1/chat/completions"
    assert output.is_success and output.event_num_tokens == [1, 1]
    assert (output.num_prompt_tokens, output.num_output_tokens) == (12, 2)


@pytest.mark.parametrize("status_code, body, expected", [
    (422, b'{"error":"Input validation error","error_type":"validation"}', "HTTP 422"),
    (200, b'data:{"error":"Model is overloaded","error_type":"overloaded"}\n\n', "overloaded: Model is overloaded"),
    (200, b"", "the stream ended without a token"),
    (200, b"data:{not json\n\n", "JSONDecodeError"),
])
def test_failures_are_recorded_not_raised(status_code, body, expected):
    output = run_one("tgi", body, status_code)
    assert not output.is_success
    assert expected in output.error


def test_run_rate_caps_concurrency_and_counts_every_request():
    in_flight, peak = [0], [0]

    async def body():
        in_flight[0] += 1
        peak[0] = max(peak[0], in_flight[0])
        await asyncio.sleep(0.01)
        yield sse(tgi_token(1, {"finish_reason": "length", "generated_tokens": 1, "input_length": 2}))
        in_flight[0] -= 1

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body())

    async def go():
        config = ServeBenchConfig("tgi", "http://server", None, (math.inf,), max_concurrency=2,
                                  is_progress_shown=False)
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await run_rate(client, config, [SAMPLE] * 6, math.inf)

    result = asyncio.run(go())
    assert peak[0] == 2
    assert result.metrics.num_completed == 6 and len(result.outputs) == 6
    assert result.metrics.total_output_tokens == 6 and result.metrics.total_input_tokens == 12


def test_config_rejects_unknown_backend_and_bad_concurrency():
    with pytest.raises(ValueError):
        ServeBenchConfig("vllm", "http://x", None, (1.0,))
    with pytest.raises(ValueError):
        ServeBenchConfig("tgi", "http://x", None, (1.0,), max_concurrency=0)
