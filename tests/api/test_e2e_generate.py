"""TGI's native routes end to end: a real `tgserve serve` process on the demo model, over HTTP."""
from __future__ import annotations

import json

import httpx
import pytest

from tgserve.api.tgi.schemas import GenerateResponse, Info, StreamResponse

PROMPT = "Once upon a time"


def generate(client: httpx.Client, inputs: str = PROMPT, **params) -> httpx.Response:
    return client.post("/generate", json={"inputs": inputs, "parameters": params})


def stream_events(client: httpx.Client, inputs: str = PROMPT, **params) -> list[dict]:
    """POST /generate_stream and parse every `data:` event."""
    with client.stream("POST", "/generate_stream", json={"inputs": inputs, "parameters": params}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return [json.loads(line[len("data:"):]) for line in response.iter_lines() if line.startswith("data:")]


def test_health_and_info(client):
    health = client.get("/health")
    assert health.status_code == 200 and health.content == b""
    info = Info.model_validate(client.get("/info").json())
    assert info.router == "text-generation-router" and info.max_concurrent_requests == 128
    assert (info.max_input_tokens, info.max_total_tokens) == (1024, 4096)
    assert info.model_device_type == "cpu"


def test_generate_greedy_with_details(client):
    response = generate(client, max_new_tokens=12, details=True, top_n_tokens=2)
    assert response.status_code == 200
    body = GenerateResponse.model_validate(response.json())
    details = body.details
    assert body.generated_text and details.generated_tokens == len(details.tokens) <= 12
    assert details.finish_reason in ("length", "eos_token")
    assert details.seed is None  # greedy
    assert details.prefill == []  # no --enable-prefill-logprobs
    assert len(details.top_tokens) == len(details.tokens) and all(len(t) == 2 for t in details.top_tokens)
    assert "".join(t.text for t in details.tokens if not t.special) == body.generated_text
    assert generate(client, max_new_tokens=12).json() == {"generated_text": body.generated_text}  # deterministic
    for header in ("x-compute-type", "x-compute-time", "x-compute-characters", "x-total-time", "x-validation-time",
                   "x-queue-time", "x-inference-time", "x-time-per-token"):
        assert header in response.headers
    assert response.headers["x-compute-characters"] == str(len(PROMPT))
    assert response.headers["x-generated-tokens"] == str(details.generated_tokens)


def test_return_full_text_and_truncate(client):
    plain = generate(client, max_new_tokens=5).json()["generated_text"]
    full = generate(client, max_new_tokens=5, return_full_text=True).json()["generated_text"]
    assert full == PROMPT + plain
    truncated = generate(client, max_new_tokens=3, truncate=2)
    assert truncated.status_code == 200 and truncated.headers["x-prompt-tokens"] == "2"


def test_sampling_reports_and_honours_the_seed(client):
    first = generate(client, max_new_tokens=10, do_sample=True, seed=42, details=True).json()
    again = generate(client, max_new_tokens=10, do_sample=True, seed=42, details=True).json()
    assert first["details"]["seed"] == 42 and first["generated_text"] == again["generated_text"]
    drawn = generate(client, max_new_tokens=2, temperature=0.7, details=True).json()["details"]["seed"]
    assert isinstance(drawn, int) and 0 <= drawn < 2**64


def test_stop_sequence(client):
    text = generate(client, max_new_tokens=12).json()["generated_text"]
    stop = text.split()[1]
    body = generate(client, max_new_tokens=12, stop=[stop], details=True).json()
    assert body["details"]["finish_reason"] == "stop_sequence" and body["generated_text"].endswith(stop)


def test_stream_matches_generate(client):
    events = stream_events(client, max_new_tokens=10, details=True)
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    for event in events:
        StreamResponse.model_validate(event)
        assert "top_tokens" not in event
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    assert last["generated_text"] == "".join(e["token"]["text"] for e in events if not e["token"]["special"])
    assert last["generated_text"] == generate(client, max_new_tokens=10).json()["generated_text"]
    assert last["details"]["generated_tokens"] == len(events) and last["details"]["input_length"] > 0


def test_stream_without_details_and_with_top_tokens(client):
    events = stream_events(client, max_new_tokens=3, top_n_tokens=3)
    assert events[-1]["details"] is None and events[-1]["generated_text"]
    assert all(len(e["top_tokens"]) == 3 for e in events)


@pytest.mark.parametrize("params, message", [
    ({"temperature": 0}, "Input validation error: `temperature` must be strictly positive"),
    ({"top_p": 0}, "Input validation error: `top_p` must be > 0.0 and <= 1.0"),
    ({"stop": ["a"] * 5}, "Input validation error: `stop` supports up to 4 stop sequences. Given: 5"),
    ({"grammar": {"type": "regex", "value": 5}},
     "Input validation error: a `regex` grammar's value must be a string, got int"),
])
def test_validation_errors(client, params, message):
    response = generate(client, **params)
    assert response.status_code == 422
    assert response.json() == {"error": message, "error_type": "validation"}
    events = stream_events(client, **params)  # TGI validates inside the stream: HTTP 200, one error event
    assert events == [{"error": message, "error_type": "validation"}]


def test_max_new_tokens_over_the_budget_is_accepted_as_in_tgi(client):
    """TGI (TGI-CONTRACT.md section 2.2, `max_new_tokens`) checks the budget with at most 1024 new
    tokens and stops with `length` at max_total_tokens, so 4096 new tokens after a short prompt on a
    server with max_total_tokens 4096 is an HTTP 200 stream of tokens, not a 422."""
    with client.stream("POST", "/generate_stream",
                       json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4096}}) as response:
        assert response.status_code == 200
        first = next(line for line in response.iter_lines() if line.startswith("data:"))
    event = json.loads(first[len("data:"):])
    assert "error" not in event and isinstance(event["token"]["id"], int)


def test_input_too_long(client):
    response = generate(client, inputs="word " * 1500, max_new_tokens=1)
    assert response.status_code == 422
    assert response.json()["error"].startswith("Input validation error: `inputs` must have less than 1024 tokens")


@pytest.mark.parametrize("body", [
    b'{"inputs": "hi",',  # malformed JSON
    b'{"inputs": 3}',  # wrong type
    b'{"inputs": "hi", "parameters": {"max_new_tokens": "ten"}}',
    b'{"inputs": "hi", "parameters": {"max_new_tokens": -1}}',
    b'{"parameters": {}}',  # no inputs
    b'{"inputs": "hi", "parameters": {"temperature": NaN}}',  # Python's json accepts NaN; we do not
])
def test_malformed_bodies_are_422_in_the_envelope(client, body):
    response = client.post("/generate", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error_type"] == "validation" and response.json()["error"]


def test_stream_refuses_decoder_input_details(client):
    events = stream_events(client, max_new_tokens=2, decoder_input_details=True)
    assert events == [{"error": "Input validation error: `decoder_input_details` == true is not supported when "
                                "streaming tokens", "error_type": "validation"}]


def test_compat_route(client):
    listed = client.post("/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4, "return_full_text": False}})
    assert listed.status_code == 200
    assert listed.json() == [generate(client, max_new_tokens=4).json()]
    with client.stream("POST", "/", json={"inputs": PROMPT, "stream": True,
                                          "parameters": {"max_new_tokens": 3}}) as response:
        events = [line for line in response.iter_lines() if line.startswith("data:")]
    assert len(events) == 3


def test_compat_route_returns_the_full_text_by_default_and_ignores_unknown_fields(client):
    """TGI's POST / defaults return_full_text on when the model has no pipeline tag (the demo
    checkpoint has none), and TGI's serde ignores fields it does not know, in the body and its parameters."""
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4, "foo": 1}, "bar": 2}
    response = client.post("/", json=body)
    assert response.status_code == 200
    (answer,) = response.json()
    assert answer == {"generated_text": PROMPT + generate(client, max_new_tokens=4).json()["generated_text"]}


def test_without_api_key_or_origins_every_route_is_open_to_any_origin(client):
    """No --api-key: generation needs no header; no --cors-allow-origin: TGI allows any origin."""
    response = client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}},
                           headers={"Origin": "http://anywhere.example"})
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == "*"
