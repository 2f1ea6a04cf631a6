"""A failing engine step over HTTP, on the real engine: TGI's 424 and stream error events, /health
turning 503 until a step succeeds again, and a best_of request whose running candidate fails.

The fault comes from a test backend installed like a vendor's plugin (`tests/backends/faulty_plugin.py`,
`--backend faulty`): the cpu backend whose model forward fails once each time the test writes the
fault file, as a lost device would. Nothing in the server is patched. One server for the module,
with `--max-batch-size 1`, so a best_of request runs one candidate while the other waits: a fault
then fails exactly one candidate.

Expected bodies are TGI's (TGI-CONTRACT section 2, `infer.rs` errors): "Request failed during
generation: <cause>" with error_type "generation", and the OpenAI routes' stream error event.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import httpx
import pytest

from tests.backends.plugin_install import env_with_site, install_backend_plugin

from .metrics_scrape import is_released, num_decode_steps, scrape, value, wait_for_metrics

PLUGIN_SOURCE = Path(__file__).parents[1] / "backends" / "faulty_plugin.py"
FAULT_FILE_ENV = "TGSERVE_TEST_FAULT_FILE"  # faulty_plugin.FAULT_FILE_ENV (the plugin is not importable here)
CAUSE = "device lost"
FAILURE = {"error": f"Request failed during generation: {CAUSE}", "error_type": "generation"}
LONG = 2000  # new tokens of the best_of request; the demo model does not stop this prompt early
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def fault_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fault") / "fault"


@pytest.fixture(scope="module")
def server(start_server, fault_file: Path, tmp_path_factory: pytest.TempPathFactory):
    site = tmp_path_factory.mktemp("faulty-site")
    install_backend_plugin(site, "faultyplug", PLUGIN_SOURCE, "faulty")
    env = {**env_with_site(site), FAULT_FILE_ENV: str(fault_file)}
    return start_server("--backend", "faulty", "--max-batch-size", "1", "--max-concurrent-requests", "2", env=env)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


@pytest.fixture
def fail_next_step(fault_file: Path, client: httpx.Client):
    """`fail_next_step()` makes the engine's next model step raise; the test must run one."""
    assert client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 1}}).status_code == 200

    def arm(text: str = CAUSE) -> None:
        staged = fault_file.with_suffix(".tmp")
        staged.write_text(text)
        os.replace(staged, fault_file)  # the engine thread never reads a half-written file

    yield arm
    assert not fault_file.exists(), "the armed fault was never consumed by a model step"


def sse(text: str) -> list:
    payloads = [line[len("data:"):].strip() for line in text.split("\n") if line.startswith("data:")]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


def test_generate_fails_with_424(client, fail_next_step):
    fail_next_step()
    response = client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}})
    assert (response.status_code, response.json()) == (424, FAILURE)


def test_generate_stream_sends_one_error_event(client, fail_next_step):
    fail_next_step()
    stream = client.post("/generate_stream", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}})
    assert stream.status_code == 200
    assert stream.text == f"data:{json.dumps(FAILURE, separators=(',', ':'))}\n\n"


CHAT = {"model": "tgi", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3}


def test_chat_completions_fail_with_424(client, fail_next_step):
    fail_next_step()
    response = client.post("/v1/chat/completions", json=CHAT)
    assert (response.status_code, response.json()) == (424, FAILURE)


def test_chat_stream_sends_an_openai_error_event_then_done(client, fail_next_step):
    fail_next_step()
    stream = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert stream.status_code == 200
    assert sse(stream.text) == [{"error": {"message": FAILURE["error"], "http_status_code": 422}}, "[DONE]"]


def test_two_prompt_completions_fail_with_424_and_free_the_other_prompt(server, client, fail_next_step):
    fail_next_step()
    response = client.post("/v1/completions", json={"model": "tgi", "prompt": [PROMPT, "The cat"], "max_tokens": 3})
    assert (response.status_code, response.json()) == (424, FAILURE)
    wait_for_metrics(server.url, is_released, "the other prompt left the engine and freed its blocks")


BUG = "an engine bug"  # a plain ValueError out of the model step: a failure, not the client's fault
BUG_FAILURE = {"error": f"Request failed during generation: {BUG}", "error_type": "generation"}


@pytest.mark.parametrize("route", ["/generate", "/generate_stream", "/v1/chat/completions",
                                   "/v1/chat/completions stream"])
def test_a_value_error_in_the_engine_is_a_generation_failure_not_a_validation_error(client, fail_next_step, route):
    """A `ValueError` raised inside the engine (the faulty backend's model step) is TGI's 424
    "generation" failure, on every route and in every stream shape, never a 422: only the engine's
    typed `RequestRejected` and the API's own validation mean the client sent something wrong."""
    fail_next_step(f"ValueError: {BUG}")  # faulty_plugin.VALUE_ERROR_PREFIX
    path, _, mode = route.partition(" ")
    if path == "/v1/chat/completions":
        response = client.post(path, json={**CHAT, "stream": mode == "stream"})
    else:
        response = client.post(path, json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}})
    if path == "/generate":
        assert (response.status_code, response.json()) == (424, BUG_FAILURE)
    elif path == "/generate_stream":
        assert (response.status_code, sse(response.text)) == (200, [BUG_FAILURE])
    elif mode == "stream":  # the OpenAI routes' in-stream error always says 422 in its body, as TGI's
        assert (response.status_code, sse(response.text)) == (
            200, [{"error": {"message": BUG_FAILURE["error"], "http_status_code": 422}}, "[DONE]"])
    else:
        assert (response.status_code, response.json()) == (424, BUG_FAILURE)


def test_a_failed_step_makes_health_503_until_a_step_succeeds(client, fail_next_step):
    assert (client.get("/health").status_code, client.get("/health").content) == (200, b"")
    fail_next_step()
    assert client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}).status_code == 424
    unhealthy = client.get("/health")
    assert (unhealthy.status_code, unhealthy.json()) == (503, {"error": "unhealthy", "error_type": "healthcheck"})
    assert client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}).status_code == 200
    assert client.get("/health").status_code == 200


def test_a_failing_best_of_candidate_fails_the_request_and_cancels_the_other(server, client, fail_next_step):
    """With one candidate running and the other queued (`--max-batch-size 1`), the running one's
    step fails: the request is a 424, and the other candidate must leave the engine long before
    the `LONG - 1` decode steps that running it to its end would take."""
    before, _ = scrape(server.url)
    results: dict[str, httpx.Response] = {}
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": LONG, "best_of": 2, "do_sample": True}}
    worker = threading.Thread(target=lambda: results.update(response=client.post("/generate", json=body)))
    worker.start()
    armed_at = wait_for_metrics(
        server.url, lambda s: (value(s, "tgi_batch_current_size"), value(s, "tgi_queue_size")) == (1, 1)
        and num_decode_steps(s) > num_decode_steps(before), "one candidate decoding, the other queued")
    fail_next_step()
    worker.join(timeout=300)
    assert (results["response"].status_code, results["response"].json()) == (424, FAILURE)
    after = wait_for_metrics(server.url, is_released, "both candidates left the engine and freed their blocks")
    assert num_decode_steps(after) - num_decode_steps(armed_at) < LONG - 1
    failures = value(after, "tgi_request_failure", err="generation") - value(before, "tgi_request_failure",
                                                                            err="generation")
    assert failures == 1  # the request is metered once, whichever candidate failed
