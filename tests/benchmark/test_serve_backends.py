"""The serving benchmark's request clients (tgi, openai-completions, openai-chat) against the real server.

Each client streams from the package's demo-model `tgserve serve` (tests/benchmark/conftest.py).
Oracles independent of the clients: transformers' tokenizer for prompt token counts (of the prompt, or
of the chat template the server applies to it), the server's own non-streamed answer to the same greedy
request (`details.generated_tokens`, `usage.completion_tokens`) for generated tokens, and the limits
the server was started with for its error messages. The parsing tests read fixed strings; the two
MockTransport streams left are shapes the real server cannot be made to send (each says why).
"""
from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest
from transformers import AutoTokenizer

from tests.api.conftest import TEST_LIMIT_FLAGS
from tests.benchmark.conftest import PAYLOAD_LIMIT_BYTES
from tgserve.benchmark.datasets import SampleRequest
from tgserve.benchmark.metrics_serve import itls_s, ttft_s
from tgserve.benchmark.serve import ServeBenchConfig, make_client, run_rate
from tgserve.benchmark.serve_backends import BACKENDS, parse_openai_event, parse_tgi_event, send_request, sse_data

SAMPLE = SampleRequest("Hello there", num_prompt_tokens=3, num_output_tokens=4)
PROMPT = "Once upon a time"
# Below the demo model's own stop on every route (its chat answer to PROMPT ends after 13 tokens): tgserve
# has no `ignore_eos` (TGI neither; the OpenAI routes ignore vLLM's field), so an EOS ends a forced request too.
NUM_OUTPUT_TOKENS = 8
MAX_INPUT_TOKENS = int(TEST_LIMIT_FLAGS[TEST_LIMIT_FLAGS.index("--max-input-tokens") + 1])


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir):
    return AutoTokenizer.from_pretrained(str(demo_model_dir))


def prompt_tokens(tokenizer, backend: str, prompt: str) -> int:
    """The prompt's token count by transformers: the chat route counts the templated conversation."""
    if backend == "openai-chat":
        return len(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False))
    return len(tokenizer(prompt).input_ids)


def stream(server, backend: str, sample: SampleRequest, force_output_len: bool = True):
    async def go():
        async with httpx.AsyncClient(timeout=120) as client:
            return await send_request(client, BACKENDS[backend], server.url + "/", "demo", sample, force_output_len)

    return asyncio.run(go())


def generated_tokens_without_streaming(server, backend: str, num_tokens: int) -> int:
    """What the server itself reports for the same greedy request, asked without streaming (hand-written bodies)."""
    with httpx.Client(base_url=server.url, timeout=120) as client:
        if backend == "tgi":
            body = {"inputs": PROMPT, "parameters": {"max_new_tokens": num_tokens, "details": True, "do_sample": False}}
            details = client.post("/generate", json=body).json()["details"]
            assert len(details["tokens"]) == details["generated_tokens"]
            return details["generated_tokens"]
        common = {"model": "demo", "max_tokens": num_tokens, "temperature": 0.0}
        if backend == "openai-completions":
            return client.post("/v1/completions", json={**common, "prompt": PROMPT}).json()["usage"]["completion_tokens"]
        body = {**common, "messages": [{"role": "user", "content": PROMPT}]}
        return client.post("/v1/chat/completions", json=body).json()["usage"]["completion_tokens"]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_forced_length_stream_is_counted_and_timed_token_by_token(server, tokenizer, backend):
    output = stream(server, backend, SampleRequest(PROMPT, num_prompt_tokens=0, num_output_tokens=NUM_OUTPUT_TOKENS))
    assert output.is_success and output.error == ""
    # The client's own count: tgserve streams one event per token.
    assert output.event_num_tokens == [1] * NUM_OUTPUT_TOKENS
    # Usage read from the stream replaces the dataset's counts, and agrees with the oracles.
    assert output.num_reported_output_tokens == NUM_OUTPUT_TOKENS
    assert generated_tokens_without_streaming(server, backend, NUM_OUTPUT_TOKENS) == NUM_OUTPUT_TOKENS
    assert output.num_prompt_tokens == prompt_tokens(tokenizer, backend, PROMPT)
    assert (output.num_output_tokens, output.num_requested_output_tokens) == (NUM_OUTPUT_TOKENS, NUM_OUTPUT_TOKENS)
    # Sent, first token (TTFT), each later token (ITLs), end of stream: in that order.
    timeline = [output.send_time_s, *output.event_times_s, output.end_time_s]
    assert timeline == sorted(timeline) and len(output.event_times_s) == NUM_OUTPUT_TOKENS
    assert ttft_s(output) > 0
    itls = itls_s(output.event_times_s, output.event_num_tokens)
    assert len(itls) == NUM_OUTPUT_TOKENS - 1 and all(gap >= 0 for gap in itls)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_prompt_the_server_rejects_is_a_failure_with_its_message(server, tokenizer, backend):
    """Too long an input: tgserve (as TGI) answers a streamed request 200 with one error event."""
    prompt = "word " * (MAX_INPUT_TOKENS + 50)
    output = stream(server, backend, SampleRequest(prompt, num_prompt_tokens=0, num_output_tokens=4))
    message = (f"Input validation error: `inputs` must have less than {MAX_INPUT_TOKENS} tokens. "
               f"Given: {prompt_tokens(tokenizer, backend, prompt)}")
    assert not output.is_success
    assert output.error == (f"validation: {message}" if backend == "tgi" else message)
    assert output.event_times_s == [] and output.end_time_s >= output.send_time_s


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_an_http_error_status_is_a_failure_with_the_servers_body(server, backend):
    """A body over --payload-limit: 413 before any route runs."""
    output = stream(server, backend, SampleRequest("x" * PAYLOAD_LIMIT_BYTES, num_prompt_tokens=0, num_output_tokens=4))
    assert not output.is_success
    status, _, body = output.error.partition(": ")
    assert status == "HTTP 413"
    assert json.loads(body) == {"error": f"Payload too large: the request body exceeds {PAYLOAD_LIMIT_BYTES} bytes",
                                "error_type": "payload_limit"}


def test_run_rate_caps_concurrency_and_counts_every_request(server, tokenizer):
    """Six requests sent at once with at most two in flight; every token and prompt token counted."""
    num_requests, num_tokens = 6, 3
    config = ServeBenchConfig("tgi", server.url, None, (math.inf,), max_concurrency=2, force_output_len=True,
                              is_progress_shown=False)
    samples = [SampleRequest(PROMPT, num_prompt_tokens=0, num_output_tokens=num_tokens)] * num_requests

    async def go():
        async with make_client(config.max_concurrency) as client:
            return await run_rate(client, config, samples, math.inf)

    result = asyncio.run(go())
    assert all(output.is_success for output in result.outputs), [output.error for output in result.outputs]
    assert result.metrics.num_completed == num_requests and result.metrics.num_failed == 0
    assert result.metrics.total_output_tokens == num_requests * num_tokens
    assert result.metrics.total_input_tokens == num_requests * len(tokenizer(PROMPT).input_ids)
    # The client's own records: each request's [sent, stream ended] lies inside its semaphore slot.
    edges = sorted([(o.send_time_s, 1) for o in result.outputs] + [(o.end_time_s, -1) for o in result.outputs])
    in_flight = [sum(step for _, step in edges[:i + 1]) for i in range(len(edges))]
    assert max(in_flight) == 2


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


def tgi_token(index: int, details: dict | None = None) -> dict:
    return {"index": index, "token": {"id": index, "text": f" t{index}", "logprob": -0.1, "special": False},
            "generated_text": None if details is None else "text", "details": details}


def test_event_parsers():
    assert sse_data("data: {}") == "{}" and sse_data("data:[DONE]") == "[DONE]" and sse_data(": ping") is None
    last = parse_tgi_event(tgi_token(3, {"finish_reason": "length", "generated_tokens": 3, "input_length": 9}), 2)
    assert (last.num_tokens, last.num_prompt_tokens, last.num_output_tokens) == (1, 9, 3)
    assert parse_tgi_event({"error": "too long", "error_type": "validation"}, 0).error == "validation: too long"
    assert parse_tgi_event({"error": "Model is overloaded", "error_type": "overloaded"}, 0).error == \
        "overloaded: Model is overloaded"
    chunk = {"choices": [{"index": 0, "text": " a"}], "usage": {"prompt_tokens": 5, "completion_tokens": 4}}
    assert parse_openai_event(chunk, 1).num_tokens == 3  # running usage: a chunk of three tokens
    assert parse_openai_event({"choices": [{"delta": {"role": "assistant", "content": ""}}]}, 0).num_tokens == 0
    assert parse_openai_event({"choices": [{"delta": {"content": "x"}}]}, 0).num_tokens == 1
    usage_only = parse_openai_event({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7}}, 7)
    assert (usage_only.num_tokens, usage_only.num_output_tokens) == (0, 7)
    assert parse_openai_event({"error": {"message": "bad model"}}, 0).error == "bad model"


def mock_stream(backend: str, body: bytes):
    """`send_request` over a MockTransport answering `body`: only for streams tgserve never sends."""
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await send_request(client, BACKENDS[backend], "http://server/", "m", SAMPLE, True)

    return asyncio.run(go())


def test_running_usage_counts_a_multi_token_chunk_as_its_tokens():
    """vLLM's `continuous_usage_stats` (running usage in every chunk, several tokens per chunk under
    speculative decoding): tgserve sends neither, so only a mock stream can carry it."""
    chunks = [{"choices": [{"text": " a"}], "usage": {"prompt_tokens": 6, "completion_tokens": 1}},
              {"choices": [{"text": " b c"}], "usage": {"prompt_tokens": 6, "completion_tokens": 3}},
              {"choices": [], "usage": {"prompt_tokens": 6, "completion_tokens": 3}}]
    body = "".join(f"data:{json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
    output = mock_stream("openai-completions", body.encode())
    assert output.is_success
    assert output.event_num_tokens == [1, 2]
    assert (output.num_prompt_tokens, output.num_output_tokens) == (6, 3)


@pytest.mark.parametrize("body, expected", [(b"", "the stream ended without a token"),
                                            (b"data:{not json\n\n", "JSONDecodeError")])
def test_a_broken_stream_is_recorded_not_raised(body, expected):
    """An empty 200 stream or an event that is not JSON: a broken server or proxy, not tgserve."""
    output = mock_stream("tgi", body)
    assert not output.is_success
    assert expected in output.error


def test_config_rejects_unknown_backend_and_bad_concurrency():
    with pytest.raises(ValueError):
        ServeBenchConfig("vllm", "http://x", None, (1.0,))
    with pytest.raises(ValueError):
        ServeBenchConfig("tgi", "http://x", None, (1.0,), max_concurrency=0)
