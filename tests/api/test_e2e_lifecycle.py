"""The `tgserve` command's life: start-up failures as one stderr line, `backends`, JSON logs, and
SIGTERM letting in-flight requests finish before a clean exit 0."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tgserve.core.engine import STOPPED_WITH_REQUESTS_IN_FLIGHT

from .metrics_scrape import WAIT_TIMEOUT_S, is_idle, num_dropped, value, wait_for_metrics

GRACEFUL_WAIT_S = 600.0


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_backends_lists_cpu_as_usable(run_cli):
    result = run_cli("backends")
    assert result.returncode == 0
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert rows["cpu"][1] == "yes"
    assert rows["gaudi"][1] == "no" and "tgserve[gaudi]" in result.stdout


def test_unusable_backend_fails_at_once_with_the_install_line(run_cli):
    result = run_cli("serve", "--backend", "gaudi")
    assert result.returncode != 0
    line = one_error_line(result.stderr)
    assert "gaudi" in line and "pip install tgserve[gaudi]" in line
    assert "Loading" not in result.stdout  # failed before loading anything


@pytest.mark.parametrize("args, returncode, message", [
    (("--port", "http"), 2, "invalid int value: 'http'"),
    (("--dtype", "int4"), 2, "invalid choice: 'int4'"),
    (("--max-input-tokens", "10", "--max-total-tokens", "10"), 1,
     "`max_input_tokens`(10) must be < `max_total_tokens`(10)"),
    (("--max-input-tokens", "5", "--max-input-length", "6"), 1,
     "Both `max_input_tokens` (5) and `max_input_length` (6)"),
    (("--backend", "nosuch"), 1, "unknown backend 'nosuch'"),
])
def test_bad_flags_are_one_line(run_cli, args, returncode, message):
    result = run_cli("serve", *args)
    assert result.returncode == returncode
    assert message in one_error_line(result.stderr)


def test_startup_failure_in_build_engine_is_one_line(run_cli, model_dir):
    result = run_cli("serve", "--model-id", str(model_dir), "--max-batch-total-tokens", str(10**15),
                     "--max-total-tokens", "4096", "--backend", "cpu")
    assert result.returncode == 1
    assert "Not enough memory to handle `max_batch_total_tokens=" in one_error_line(result.stderr)


def wait_until_refused(url: str, is_still_running: threading.Event) -> None:
    """Poll GET /health on new connections until one is refused, while `is_still_running` is set."""
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while is_still_running.is_set():
        try:
            httpx.get(f"{url}/health", timeout=5)
        except httpx.TransportError:
            return
        assert time.monotonic() < deadline, "the server still accepts connections after SIGTERM"
        time.sleep(0.05)
    raise AssertionError("new connections were accepted until the in-flight requests had finished")


def test_sigterm_lets_in_flight_requests_finish(start_server):
    # Two 1500-token requests take seconds on an idle machine and over a minute on a busy 2-core one;
    # the graceful wait (and every timeout below) only bounds a hang, so it is far longer than either.
    server = start_server("--json-output", "-g", str(int(GRACEFUL_WAIT_S)))
    results: dict[str, object] = {}
    is_generating = threading.Event()

    def generate() -> None:
        body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 1500, "details": True}}
        is_generating.set()
        try:
            results["generate"] = httpx.post(f"{server.url}/generate", json=body, timeout=GRACEFUL_WAIT_S)
        finally:
            is_generating.clear()

    with httpx.Client(base_url=server.url, timeout=GRACEFUL_WAIT_S) as client:
        body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 1500}}
        with client.stream("POST", "/generate_stream", json=body) as stream:
            lines = (line for line in stream.iter_lines() if line.startswith("data:"))
            next(lines)
            worker = threading.Thread(target=generate)
            worker.start()
            # Both requests reached the server: each was validated and handed to the engine.
            wait_for_metrics(server.url, lambda s: value(s, "tgi_request_input_length_count") == 2,
                             "the /generate request reached the engine")
            server.process.terminate()  # SIGTERM while both requests are in flight
            # No new connections are accepted while they still run (the demo model never stops this
            # prompt early: 1500 tokens take far longer than closing the listening socket).
            wait_until_refused(server.url, is_generating)
            events = [json.loads(line[len("data:"):]) for line in lines]
        worker.join(timeout=GRACEFUL_WAIT_S)
    assert events[-1]["generated_text"] and len(events) + 1 == events[-1]["index"]
    response = results["generate"]
    assert response.status_code == 200
    details = response.json()["details"]
    assert details["generated_tokens"] == len(details["tokens"]) > 0
    assert server.process.wait(timeout=GRACEFUL_WAIT_S) == 0
    records = [json.loads(line) for line in server.log().splitlines() if line.strip()]
    assert all({"timestamp", "level", "message", "target"} <= record.keys() for record in records)
    assert any(record["message"] == "Shutting down" for record in records)


def test_disconnected_request_does_not_delay_shutdown(start_server):
    """The server dropped the abandoned request, so shutdown has nothing to wait for.

    A stream the server had not noticed was gone would never count as dropped (and would hold
    uvicorn's graceful wait); a request left in the engine would hold the engine's drain wait and be
    logged as `STOPPED_WITH_REQUESTS_IN_FLIGHT` (tests/core/test_engine_behaviour.py shows that it is).
    """
    server = start_server("-g", "60")
    with httpx.Client(base_url=server.url, timeout=60) as client:
        body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 3000}}
        with client.stream("POST", "/generate_stream", json=body) as stream:
            next(stream.iter_lines())
    wait_for_metrics(server.url, lambda s: is_idle(s) and num_dropped(s) == 1,
                     "the closed stream counted as dropped and out of the batch")
    assert server.terminate() == 0
    log = server.log()
    assert "engine stopped" in log
    assert STOPPED_WITH_REQUESTS_IN_FLIGHT not in log


def test_sigterm_cuts_requests_still_running_when_the_graceful_timeout_expires(start_server):
    """`-g` bounds the wait: a request still running when it expires is cut off, and the server exits 0.

    As TGI's launcher (`terminate` in launcher/src/main.rs: SIGTERM, wait `-g` seconds, kill; then
    exit 0): the client's stream breaks off without its final event, no error event is promised.
    uvicorn logs that it cancelled the request's task; the engine, told by the closed stream, drops
    the request, so its own drain wait finds nothing in flight. The 3000 tokens asked for take far
    longer than the 1 s grace (hundreds of decode steps), so the request is still running when it ends.
    """
    server = start_server("-g", "1")
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 3000}}
    events = []
    with httpx.Client(base_url=server.url, timeout=WAIT_TIMEOUT_S) as client:
        with client.stream("POST", "/generate_stream", json=body) as stream:
            lines = (line for line in stream.iter_lines() if line.startswith("data:"))
            events.append(json.loads(next(lines)[len("data:"):]))
            server.process.terminate()  # SIGTERM while the request runs
            with pytest.raises(httpx.RemoteProtocolError):  # the body ends without its last chunk
                events.extend(json.loads(line[len("data:"):]) for line in lines)
    assert all(event["generated_text"] is None for event in events), "the request ran to its end"
    assert all("error" not in event for event in events)
    assert server.process.wait(timeout=WAIT_TIMEOUT_S) == 0
    log = server.log()
    assert "Cancel 1 running task(s), timeout graceful shutdown exceeded" in log
    assert "engine stopped" in log
    assert STOPPED_WITH_REQUESTS_IN_FLIGHT not in log


def test_serve_without_model_id_serves_smollm2_built_from_its_wheel(start_server, smollm2_dir):
    """The default model answers a question; it comes from the machine's cache (built by `smollm2_dir`)."""
    server = start_server("--max-batch-total-tokens", "4096", with_model_id=False,
                          env={"TGSERVE_CACHE": str(smollm2_dir.parent)})
    assert httpx.get(f"{server.url}/info", timeout=30).json()["model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    body = {"model": "tgi", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 20, "temperature": 0}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200 and "Paris" in response.json()["choices"][0]["message"]["content"]


def test_the_demo_model_is_served_by_its_name(start_server):
    server = start_server("--model-id", "tgserve/demo-qwen2", with_model_id=False)
    assert httpx.get(f"{server.url}/info", timeout=30).json()["model_id"] == "tgserve/demo-qwen2"
    response = httpx.post(f"{server.url}/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}},
                          timeout=60)
    assert response.status_code == 200 and response.json()["generated_text"]
