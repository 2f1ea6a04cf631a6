"""Server limits end to end: --max-concurrent-requests (429), client disconnects, and
--enable-prefill-logprobs, on a real server started with one concurrent request allowed."""
from __future__ import annotations

import json
import time

import httpx
import pytest

OVERLOADED = {"error": "Model is overloaded", "error_type": "overloaded"}
LONG = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 3000}}


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--max-concurrent-requests", "1", "--enable-prefill-logprobs")


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def wait_until_served(client: httpx.Client, timeout_s: float = 10.0) -> httpx.Response:
    """POST a short /generate until it is not refused as overloaded (a dropped stream frees its permit)."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
        if response.status_code != 429 or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


def test_overloaded_while_a_stream_is_open_then_disconnect(server, client):
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
        # Leaving the block closes the connection mid-stream (3000 tokens take far longer).
    started_s = time.monotonic()
    served = wait_until_served(client)
    assert served.status_code == 200 and served.json()["generated_text"]
    assert time.monotonic() - started_s < 10.0
    assert client.get("/health").status_code == 200


def test_repeated_disconnects_keep_the_server_serving(server, client):
    for _ in range(3):
        with httpx.Client(base_url=server.url, timeout=60) as holder:
            with holder.stream("POST", "/generate_stream", json=LONG) as stream:
                next(stream.iter_lines())
        assert wait_until_served(client).status_code == 200


def test_abandoned_generate_frees_its_permit(server, client):
    """A /generate whose client gave up is dropped (as TGI drops it), not run to its 3000 tokens."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/generate", json=LONG, timeout=0.5)
    started_s = time.monotonic()
    assert wait_until_served(client).status_code == 200
    assert time.monotonic() - started_s < 3.0


def test_prefill_logprobs_with_the_flag(client):
    body = client.post("/generate", json={"inputs": "Once upon a time", "parameters": {
        "max_new_tokens": 2, "decoder_input_details": True}}).json()
    prefill = body["details"]["prefill"]  # decoder_input_details implies details, as in TGI
    assert len(prefill) >= 2 and prefill[0]["logprob"] is None
    assert all(isinstance(t["logprob"], float) and t["logprob"] <= 0 for t in prefill[1:])
    assert "".join(t["text"] for t in prefill) == "Once upon a time"
