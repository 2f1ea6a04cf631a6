"""Fuzz TGI's native routes of one real `tgserve serve` with hypothesis-generated request bodies.

Bodies mix valid parameters with edge values (0, negatives, 2**64, 1e308, NaN), wrong types,
empty / huge / lone-surrogate / unicode strings, unknown fields and bodies that are not JSON at
all. Whatever arrives, the server must never answer 5xx, every error must use TGI's
`{"error", "error_type"}` envelope, every success must match TGI's OpenAPI document, and after
the run the server must be healthy and generate exactly what it generated before.

Bounded and deterministic: `derandomize=True` (a fixed seed), no example database, no deadline,
200 examples; about half the bodies are valid, max_new_tokens is 1-3 most of the time and the
server's --max-total-tokens is 40, so a request without max_new_tokens stays short too.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from .tgi_openapi import check_component, check_response, check_stream_events, sse_events

NUM_EXAMPLES = 200
MAX_INPUT_TOKENS, MAX_TOTAL_TOKENS = 24, 40
CLIENT_TIMEOUT_S = 60.0  # a request that takes longer counts as a hang
STREAM_ERROR_TYPES = {"validation", "overloaded"}  # what may legitimately replace a stream's tokens
HTTP_ERROR_TYPES = {413: "payload_limit", 422: "validation", 429: "overloaded"}
REFERENCE = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 8, "details": True}}


def _weighted(*weighted: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """one_of with integer weights (hypothesis picks branches about evenly, so repeat them)."""
    return st.one_of(*[strategy for weight, strategy in weighted for _ in range(weight)])


BIG_INTS = st.sampled_from([2**31, 2**32, 2**53 + 1, 2**63, 2**64 - 1, 2**64, 10**30, -1, -(2**63)])
ODD_FLOATS = st.sampled_from([0.0, -0.0, -1.0, 1.0, 1e-300, 5e-324, 1e308, -1e308, 2.0, -2.0, 2.0000001,
                              float("nan"), float("inf"), float("-inf")])
WRONG_TYPES = st.sampled_from(["1", "", None, True, [], {}, [1], 1.5, {"a": 1}])
TEXT = _weighted(
    (3, st.text(max_size=40)),
    (1, st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)),
    (1, st.sampled_from(["", " ", "\x00", "\ud800", "a\udfffb", "🦜" * 30, "<|im_end|>", "<|endoftext|>hi",
                         "word " * 600, "x" * 20_000, "Ω≈ç√∫˜µ≤≥÷", "\u202e\u0301\ufeff"])),
)
SMALL_NEW_TOKENS = st.integers(1, 3)
SAMPLING_PARAMETERS = {  # each valid alone
    "temperature": st.floats(0.1, 2.5),
    "repetition_penalty": st.floats(0.5, 2.0),
    "frequency_penalty": st.floats(-2.0, 2.0),
    "top_k": st.integers(1, 50),
    "top_p": st.floats(0.05, 1.0),
    "typical_p": st.floats(0.05, 0.95),
    "do_sample": st.booleans(),
    "return_full_text": st.booleans(),
    "stop": st.lists(TEXT, max_size=4),
    "truncate": st.integers(1, MAX_INPUT_TOKENS),
    "watermark": st.booleans(),
    "details": st.booleans(),
    "decoder_input_details": st.booleans(),
    "seed": st.integers(0, 2**64 - 1),
    "top_n_tokens": st.integers(0, 5),
}
VALID_PARAMETERS = st.fixed_dictionaries({
    # None means "up to max_total_tokens": rarer, and the server keeps that limit small.
    "max_new_tokens": _weighted((6, SMALL_NEW_TOKENS), (1, st.none())),
}, optional={"best_of": st.integers(1, 2), **SAMPLING_PARAMETERS})
# Every parameter at once, valid on both routes (a stream refuses decoder_input_details): requests that
# reach the engine and could leave state behind.
EVERY_PARAMETER = st.fixed_dictionaries({"max_new_tokens": SMALL_NEW_TOKENS, **{
    name: values for name, values in SAMPLING_PARAMETERS.items() if name != "decoder_input_details"}})
EDGE_VALUES = st.one_of(BIG_INTS, ODD_FLOATS, WRONG_TYPES, st.integers(-3, 3), TEXT,
                        st.sampled_from([{"type": "regex", "value": "a+"}, {"type": "bogus"}, ["a"] * 9]))
FIELDS = ["best_of", "temperature", "repetition_penalty", "frequency_penalty", "top_k", "top_p", "typical_p",
          "do_sample", "max_new_tokens", "return_full_text", "stop", "truncate", "watermark", "details",
          "decoder_input_details", "seed", "top_n_tokens", "grammar", "adapter_id", "unknown_field"]
MUTATED_PARAMETERS = st.builds(lambda valid, edges: {**valid, **edges}, VALID_PARAMETERS,
                               st.dictionaries(st.sampled_from(FIELDS), EDGE_VALUES, min_size=1, max_size=2))
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=3), max_leaves=8)
RAW_BODIES = st.sampled_from([b"", b"{", b'{"inputs": "a",}', b"\xff\xfe\x00", b"null", b'{"inputs": NaN}',
                              b'{"inputs": "a", "parameters": {"max_new_tokens": 1e400}}', b"[" * 5000])


def _request(inputs, parameters, stream=None) -> dict:
    body = {"inputs": inputs, "parameters": parameters}
    return body if stream is None else {**body, "stream": stream}


def _encoded(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return strategy.map(lambda body: json.dumps(body).encode())


BODIES = _weighted(
    (6, _encoded(st.builds(_request, TEXT, VALID_PARAMETERS))),
    (3, _encoded(st.builds(_request, TEXT, MUTATED_PARAMETERS))),
    (1, _encoded(st.builds(_request, TEXT, VALID_PARAMETERS, _weighted((3, st.booleans()), (1, EDGE_VALUES))))),
    (1, _encoded(st.builds(lambda inputs: {"inputs": inputs}, _weighted((3, TEXT), (1, EDGE_VALUES))))),
    (1, _encoded(JSON_VALUES)),
    (1, RAW_BODIES),
)


@pytest.fixture(scope="module")
def client(start_server):
    server = start_server("--max-input-tokens", str(MAX_INPUT_TOKENS), "--max-total-tokens", str(MAX_TOTAL_TOKENS))
    with httpx.Client(base_url=server.url, timeout=CLIENT_TIMEOUT_S) as client:
        yield client


@pytest.fixture(scope="module")
def reference_answer(client):
    """What the server answers to a fixed greedy request before the fuzz run."""
    response = client.post("/generate", json=REFERENCE)
    assert response.status_code == 200
    return response.json()


def _post(client: httpx.Client, path: str, content: bytes, content_type: str) -> tuple[int, bytes, str]:
    with client.stream("POST", path, content=content, headers={"content-type": content_type}) as response:
        return response.status_code, response.read(), response.headers.get("content-type", "")


def _check_answer(path: str, status: int, content: bytes, content_type: str) -> None:
    assert status < 500, f"{path} answered {status}: {content[:500]!r}"
    if content_type.startswith("text/event-stream"):
        assert status == 200
        events = sse_events(content.decode().splitlines())
        check_stream_events(path, events)
        errors = [e["error_type"] for e in events if "error" in e]
        assert set(errors) <= STREAM_ERROR_TYPES and (not errors or len(events) == 1), events
        assert errors or events[-1]["generated_text"] is not None, "stream ended without its last token"
        return
    body = json.loads(content)
    if status == 200:
        check_response(path, "post", 200, body)
    else:
        check_component(body, "ErrorResponse")
        assert HTTP_ERROR_TYPES.get(status) == body["error_type"], (status, body)


@settings(max_examples=NUM_EXAMPLES, derandomize=True, database=None, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(path=st.sampled_from(["/generate", "/generate_stream", "/"]), body=BODIES,
       content_type=_weighted((9, st.just("application/json")),
                              (1, st.sampled_from(["text/plain", "application/x-www-form-urlencoded"]))))
def test_fuzzed_requests_never_break_the_server(client, reference_answer, path, body, content_type):
    status, content, answer_type = _post(client, path, body, content_type)
    event(f"{path} -> {status} {answer_type.partition(';')[0]}")  # see --hypothesis-show-statistics
    _check_answer(path, status, content, answer_type)


NUM_BURST_REQUESTS, NUM_BURST_THREADS = 16, 4


def test_server_is_healthy_and_unchanged_after_fuzzing(client, reference_answer):
    """Self-contained: its own burst of fuzzed requests, sent concurrently (so they share steps), then
    /health and the reference answer taken before the burst (oracle: the server's own earlier answer).
    The burst is drawn by hypothesis (fixed seed), bodies only, nothing sent while drawing: mostly valid
    requests that set every sampling parameter (they reach the engine), the rest from the fuzz mix."""
    burst: list[tuple[str, bytes, str]] = []

    @settings(max_examples=NUM_BURST_REQUESTS, derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.large_base_example])
    @given(path=st.sampled_from(["/generate", "/generate_stream"]),
           body=_weighted((3, _encoded(st.builds(_request, st.text(min_size=1, max_size=40), EVERY_PARAMETER))),
                          (1, BODIES)))
    def draw(path, body):
        burst.append((path, body, "application/json"))

    draw()
    assert len(burst) == NUM_BURST_REQUESTS
    with ThreadPoolExecutor(NUM_BURST_THREADS) as pool:
        answers = list(pool.map(lambda request: (request[0], *_post(client, *request)), burst))
    assert any(status == 200 for _, status, _, _ in answers), "the burst generated nothing"
    for path, status, content, answer_type in answers:
        _check_answer(path, status, content, answer_type)
    assert client.get("/health").status_code == 200
    assert client.post("/generate", json=REFERENCE).json() == reference_answer
