"""Contract: real answers of a real `tgserve serve` validate against TGI's OpenAPI document.

Every body is checked against the schema the document gives for its route and status (see
`tgi_openapi` for how OpenAPI 3.0's `nullable` is read), across the parameters that change a
response's shape: details, top_n_tokens, prefill logprobs, best_of, sampling with a watermark,
return_full_text, stop sequences, the compat route, streams, in-stream and HTTP errors.
"""
from __future__ import annotations

import json

import httpx
import pytest

from .tgi_openapi import check_component, check_response, check_stream_events, sse_events

PROMPT = "Once upon a time"
PAYLOAD_LIMIT_BYTES = 20_000

GENERATE_CASES = {
    "plain": dict(max_new_tokens=6),
    "details": dict(max_new_tokens=6, details=True),
    "top_n_and_prefill": dict(max_new_tokens=5, details=True, top_n_tokens=3, decoder_input_details=True),
    "sampled_watermark": dict(max_new_tokens=8, details=True, do_sample=True, seed=3, watermark=True,
                              temperature=0.9, top_k=20, top_p=0.95, typical_p=0.9, repetition_penalty=1.2,
                              frequency_penalty=0.5),
    "best_of": dict(max_new_tokens=6, details=True, best_of=2, do_sample=True, top_n_tokens=2,
                    decoder_input_details=True),
    "full_text_and_stop": dict(max_new_tokens=12, details=True, return_full_text=True, stop=[" ", "e"],
                               truncate=3),
    "no_parameters": None,  # TGI's default_parameters(): sampling on
}


@pytest.fixture(scope="module")
def client(start_server):
    # Small token limits: a request without max_new_tokens generates up to max_total_tokens.
    server = start_server("--enable-prefill-logprobs", "--payload-limit", str(PAYLOAD_LIMIT_BYTES),
                          "--max-input-tokens", "24", "--max-total-tokens", "40")
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def _body(params: dict | None, **extra) -> dict:
    return {"inputs": PROMPT, **({} if params is None else {"parameters": params}), **extra}


def _stream(client: httpx.Client, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return sse_events(list(response.iter_lines()))


def test_info_and_health(client):
    info = client.get("/info")
    check_response("/info", "get", 200, info.json())
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("case", GENERATE_CASES)
def test_generate(client, case):
    params = GENERATE_CASES[case]
    response = client.post("/generate", json=_body(params))
    assert response.status_code == 200, response.text
    body = response.json()
    check_response("/generate", "post", 200, body)
    details = body.get("details")
    if params and params.get("details"):
        assert details is not None
        assert ("top_tokens" in details) == bool(params.get("top_n_tokens"))
        assert ("best_of_sequences" in details) == bool(params.get("best_of"))
        for sequence in details.get("best_of_sequences", ()):
            check_component(sequence, "BestOfSequence")
        if params.get("decoder_input_details"):
            assert details["prefill"] and details["prefill"][0]["logprob"] is None  # nullable, and used
    compat = client.post("/", json=_body(params))
    assert compat.status_code == 200
    check_response("/", "post", 200, compat.json())


@pytest.mark.parametrize("case", ["plain", "details", "sampled_watermark", "full_text_and_stop", "no_parameters"])
def test_generate_stream(client, case):
    params = GENERATE_CASES[case]
    if params is not None:
        params = {**params, "top_n_tokens": 2}
    events = _stream(client, "/generate_stream", _body(params))
    check_stream_events("/generate_stream", events)
    assert events[-1]["generated_text"] is not None and all(e["generated_text"] is None for e in events[:-1])
    assert (events[-1]["details"] is not None) == bool(params and params.get("details"))
    compat_events = _stream(client, "/", _body(params, stream=True))
    check_stream_events("/", compat_events)


ERROR_BODIES = {
    "bad_value": _body({"temperature": -1.0}),
    "best_of_greedy": _body({"best_of": 2}),
    "best_of_seed": _body({"best_of": 2, "do_sample": True, "seed": 1}),
    "best_of_too_many": _body({"best_of": 9, "do_sample": True}),
    "wrong_type": _body({"max_new_tokens": "ten"}),
    "float_for_int": _body({"top_k": 2.5}),
    "missing_inputs": {"parameters": {}},
    "empty_inputs": {"inputs": ""},
    "not_an_object": [1, 2, 3],
}


@pytest.mark.parametrize("case", ERROR_BODIES)
def test_errors_use_the_envelope(client, case):
    response = client.post("/generate", json=ERROR_BODIES[case])
    assert response.status_code == 422
    check_response("/generate", "post", 422, response.json())
    assert response.json()["error_type"] == "validation"
    with client.stream("POST", "/generate_stream", json=ERROR_BODIES[case]) as stream:
        if stream.status_code == 200:  # TGI validates inside the stream: one error event
            (event,) = sse_events(list(stream.iter_lines()))
            check_component(event, "ErrorResponse")
        else:  # the body is not a GenerateRequest at all: rejected before the stream starts
            assert stream.status_code == 422
            check_response("/generate_stream", "post", 422, json.loads(stream.read()), "text/event-stream")


def test_malformed_json_and_oversized_bodies_use_the_envelope(client):
    # Not JSON, not UTF-8 (FastAPI's own answer would be a bare 400), nested past the parser's depth.
    for content in (b'{"inputs": "x",', b"\xff\xfe\x00", b"[" * 5000):
        malformed = client.post("/generate", content=content, headers={"content-type": "application/json"})
        assert malformed.status_code == 422
        check_response("/generate", "post", 422, malformed.json())
        assert malformed.json()["error"].startswith("Input validation error: Failed to parse the request body as JSON")
    too_large = client.post("/generate", json={"inputs": "x" * PAYLOAD_LIMIT_BYTES})
    assert too_large.status_code == 413
    check_component(too_large.json(), "ErrorResponse")
