"""Server limits end to end: --max-concurrent-requests (429), client disconnects, and
--enable-prefill-logprobs, on a real server started with one concurrent request allowed."""
from __future__ import annotations

import json
import time

import httpx
import pytest

from .metrics_scrape import WAIT_TIMEOUT_S, Samples, is_idle, num_decode_steps, num_dropped, wait_for_metrics

OVERLOADED = {"error": "Model is overloaded", "error_type": "overloaded"}
LONG = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 3000}}


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--max-concurrent-requests", "1", "--enable-prefill-logprobs")


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def wait_until_served(client: httpx.Client, timeout_s: float = WAIT_TIMEOUT_S) -> httpx.Response:
    """POST a short /generate until it is not refused as overloaded (a dropped stream frees its permit)."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
        if response.status_code != 429 or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


def assert_dropped_before_its_end(url: str, before: Samples) -> None:
    """Once the engine is idle again, the one LONG request abandoned since `before` counts as dropped
    and ran fewer decode steps than its end needs.

    The demo model never stops this prompt early (greedy, it runs 3000 of 3000 tokens), so a request
    left running would take 2999 decode steps; the short requests of `wait_until_served` add one each
    at most, and only once the permit is free.
    """
    after = wait_for_metrics(url, lambda s: is_idle(s) and num_dropped(s) > num_dropped(before),
                             "the abandoned request counted as dropped and out of the batch")
    assert num_dropped(after) == num_dropped(before) + 1
    num_steps = num_decode_steps(after) - num_decode_steps(before)
    assert num_steps < LONG["parameters"]["max_new_tokens"] - 1, "the abandoned request ran to its end"


def test_overloaded_while_a_stream_is_open_then_disconnect(server, client):
    before = wait_for_metrics(server.url, is_idle, "an earlier test's requests left the batch")
    with httpx.Client(base_url=server.url, timeout=60) as holder:
        with holder.stream("POST", "/generate_stream", json=LONG) as stream:
            lines = stream.iter_lines()
            first = next(lines)
            assert first.startswith("data:") and json.loads(first[len("data:"):])["index"] == 1
            refused = client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
            assert refused.status_code == 429 and refused.json() == OVERLOADED
            refused_stream = client.post("/generate_stream", json={"inputs": "Hi"})
            assert refused_stream.status_code == 200  # TGI's quirk: the error is an event
            assert refused_stream.text == 'data:{"error":"Model is overloaded","error_type":"overloaded"}\n\n'
        # Leaving the block closes the connection mid-stream.
    served = wait_until_served(client)
    assert served.status_code == 200 and served.json()["generated_text"]
    assert_dropped_before_its_end(server.url, before)
    assert client.get("/health").status_code == 200


def test_repeated_disconnects_keep_the_server_serving(server, client):
    for _ in range(3):
        before = wait_for_metrics(server.url, is_idle, "the previous request left the batch")
        with httpx.Client(base_url=server.url, timeout=60) as holder:
            with holder.stream("POST", "/generate_stream", json=LONG) as stream:
                next(stream.iter_lines())
        assert wait_until_served(client).status_code == 200
        assert_dropped_before_its_end(server.url, before)


def test_abandoned_generate_frees_its_permit(server, client):
    """A /generate whose client gave up is dropped (as TGI drops it), not run to its 3000 tokens."""
    before = wait_for_metrics(server.url, is_idle, "an earlier test's requests left the batch")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/generate", json=LONG, timeout=0.5)
    assert wait_until_served(client).status_code == 200
    assert_dropped_before_its_end(server.url, before)


def test_prefill_logprobs_with_the_flag(client):
    body = client.post("/generate", json={"inputs": "Once upon a time", "parameters": {
        "max_new_tokens": 2, "decoder_input_details": True}}).json()
    prefill = body["details"]["prefill"]  # decoder_input_details implies details, as in TGI
    assert len(prefill) >= 2 and prefill[0]["logprob"] is None
    assert all(isinstance(t["logprob"], float) and t["logprob"] <= 0 for t in prefill[1:])
    assert "".join(t["text"] for t in prefill) == "Once upon a time"


def test_a_full_limiter_refuses_a_two_prompt_completion_or_one_of_its_prompts(server):
    """Each prompt of /v1/completions takes a permit (TGI's `completions` handler runs one generate
    per prompt); with one permit a two-prompt request is a 429 as a whole, or when streaming an
    overloaded event for one prompt while the other streams to its end, then [DONE]."""
    body = {"model": "tgi", "prompt": ["Once upon a time", "The cat"], "max_tokens": 8, "temperature": 0}
    with httpx.Client(base_url=server.url, timeout=120) as client:
        refused = client.post("/v1/completions", json=body)
        assert (refused.status_code, refused.json()) == (429, OVERLOADED)
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
            payloads = [line[len("data:"):].strip() for line in stream.iter_lines() if line.startswith("data:")]
        assert payloads[-1] == "[DONE]"
        events = [json.loads(payload) for payload in payloads[:-1]]
        errors = [event for event in events if "error" in event]
        assert errors == [{"error": {"message": "Model is overloaded", "http_status_code": 422}}]
        chunks = [event for event in events if "error" not in event]
        assert len({chunk["choices"][0]["index"] for chunk in chunks}) == 1  # one prompt ran, the other was refused
        assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "eos_token")
        assert client.post("/v1/completions", json=body | {"prompt": "The cat"}).status_code == 200  # permit back
