"""`best_of` end to end: a real `tgserve serve` on the demo model, TGI's rules, messages and shapes."""
from __future__ import annotations

import json

import httpx
import pytest

from tgserve.api.tgi.schemas import GenerateResponse

from .metrics_scrape import scrape, value

PROMPT = "Once upon a time"
SAMPLED = dict(do_sample=True, temperature=1.3, max_new_tokens=10)


@pytest.fixture(scope="module")
def client(start_server):
    with httpx.Client(base_url=start_server().url, timeout=120) as client:
        yield client


def generate(client: httpx.Client, path: str = "/generate", **params) -> httpx.Response:
    return client.post(path, json={"inputs": PROMPT, "parameters": params})


def _mean_logprob(sequence) -> float:
    return sum(t.logprob for t in sequence.tokens) / len(sequence.tokens)


def test_best_of_returns_the_best_mean_logprob_and_the_others(client):
    response = generate(client, best_of=2, details=True, **SAMPLED)
    assert response.status_code == 200, response.text
    details = GenerateResponse.model_validate(response.json()).details
    (other,) = details.best_of_sequences
    assert details.seed is not None and other.seed is not None and details.seed != other.seed
    assert _mean_logprob(details) >= _mean_logprob(other)
    for sequence in (details, other):
        assert sequence.generated_tokens == len(sequence.tokens) <= 10
        assert sequence.finish_reason in ("length", "eos_token")
    assert other.generated_text == "".join(t.text for t in other.tokens if not t.special)
    assert other.top_tokens is None and other.prefill == []
    assert int(response.headers["x-generated-tokens"]) == details.generated_tokens


def test_the_winner_is_reproducible_from_its_seed(client):
    """Candidates are ordinary seeded requests: the reported seed gives back the same text alone."""
    body = generate(client, best_of=2, details=True, **SAMPLED).json()
    again = generate(client, seed=body["details"]["seed"], details=True, **SAMPLED).json()
    assert again["generated_text"] == body["generated_text"]
    loser = body["details"]["best_of_sequences"][0]
    assert generate(client, seed=loser["seed"], **SAMPLED).json()["generated_text"] == loser["generated_text"]


def test_best_of_sequences_follow_return_full_text_and_top_n_tokens(client):
    body = generate(client, best_of=2, details=True, return_full_text=True, top_n_tokens=2, **SAMPLED).json()
    (other,) = body["details"]["best_of_sequences"]
    assert body["generated_text"].startswith(PROMPT) and other["generated_text"].startswith(PROMPT)
    assert len(other["top_tokens"]) == len(other["tokens"]) and all(len(t) == 2 for t in other["top_tokens"])
    assert set(other) == {"generated_text", "finish_reason", "generated_tokens", "seed", "prefill", "tokens",
                          "top_tokens"}


def test_best_of_without_details_answers_text_only(client):
    body = generate(client, best_of=2, **SAMPLED).json()
    assert set(body) == {"generated_text"} and body["generated_text"]
    (compat,) = generate(client, "/", best_of=2, details=True, **SAMPLED).json()  # POST / wraps it in a list
    assert len(compat["details"]["best_of_sequences"]) == 1


def test_a_best_of_request_is_metered_once(client):
    """As documented in `tgserve.api.shared.best_of`: one request in the request metrics, however many candidates."""
    before, _ = scrape(str(client.base_url))
    assert generate(client, best_of=2, **SAMPLED).status_code == 200
    after, _ = scrape(str(client.base_url))
    for name in ("tgi_request_count", "tgi_request_success", "tgi_request_generated_tokens_count"):
        assert value(after, name) - value(before, name) == 1, name


@pytest.mark.parametrize("params, message", [
    (dict(best_of=3, do_sample=True), "`best_of` must be > 0 and <= 2. Given: 3"),
    (dict(best_of=2), "you must use sampling when `best_of` is > 1"),
    (dict(best_of=2, do_sample=True, seed=7), "`seed` must not be set when `best_of` > 1"),
])
def test_best_of_validation(client, params, message):
    response = generate(client, max_new_tokens=2, **params)
    assert response.status_code == 422
    assert response.json() == {"error": f"Input validation error: {message}", "error_type": "validation"}


def test_best_of_is_refused_when_streaming(client):
    body = {"inputs": PROMPT, "parameters": dict(best_of=2, **SAMPLED)}
    with client.stream("POST", "/generate_stream", json=body) as response:
        assert response.status_code == 200  # TGI validates inside the stream
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
    assert events == [{"error": "Input validation error: `best_of` != 1 is not supported when streaming tokens",
                       "error_type": "validation"}]
