"""The `tgserve` command's life: start-up failures as one stderr line, `backends`, JSON logs, and
SIGTERM letting in-flight requests finish before a clean exit 0."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest


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
    started_s = time.monotonic()
    result = run_cli("serve", "--backend", "gaudi")
    assert result.returncode != 0
    line = one_error_line(result.stderr)
    assert "gaudi" in line and "pip install tgserve[gaudi]" in line
    assert "Loading" not in result.stdout  # failed before loading anything
    assert time.monotonic() - started_s < 60


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
                     "--max-total-tokens", "4096")
    assert result.returncode == 1
    assert "Not enough memory to handle `max_batch_total_tokens=" in one_error_line(result.stderr)


def test_sigterm_lets_in_flight_requests_finish(start_server):
    server = start_server("--json-output", "-g", "60")
    results: dict[str, object] = {}

    def generate() -> None:
        body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 1500, "details": True}}
        results["generate"] = httpx.post(f"{server.url}/generate", json=body, timeout=120)

    with httpx.Client(base_url=server.url, timeout=120) as client:
        body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 1500}}
        with client.stream("POST", "/generate_stream", json=body) as stream:
            lines = (line for line in stream.iter_lines() if line.startswith("data:"))
            next(lines)
            worker = threading.Thread(target=generate)
            worker.start()
            time.sleep(0.5)
            server.process.terminate()  # SIGTERM while both requests are in flight
            time.sleep(0.5)
            with pytest.raises(httpx.TransportError):  # no new connections are accepted
                httpx.get(f"{server.url}/health", timeout=5)
            events = [json.loads(line[len("data:"):]) for line in lines]
        worker.join(timeout=120)
    assert events[-1]["generated_text"] and len(events) + 1 == events[-1]["index"]
    response = results["generate"]
    assert response.status_code == 200
    details = response.json()["details"]
    assert details["generated_tokens"] == len(details["tokens"]) > 0
    assert server.process.wait(timeout=60) == 0
    records = [json.loads(line) for line in server.log().splitlines() if line.strip()]
    assert all({"timestamp", "level", "message", "target"} <= record.keys() for record in records)
    assert any(record["message"] == "Shutting down" for record in records)


def test_disconnected_request_does_not_delay_shutdown(start_server):
    """The engine dropped the abandoned request: its 5 s drain wait finds nothing in flight."""
    server = start_server("-g", "60")
    with httpx.Client(base_url=server.url, timeout=60) as client:
        body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 3000}}
        with client.stream("POST", "/generate_stream", json=body) as stream:
            next(stream.iter_lines())
    time.sleep(0.5)
    started_s = time.monotonic()
    assert server.terminate() == 0
    assert time.monotonic() - started_s < 4.0


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
