"""The app's plumbing over a scripted engine: error paths the real model cannot be made to take
(an engine failure, an unhealthy engine), response shapes against the schemas, and that a client
disconnect closes the stream and cancels the request in the engine."""
from __future__ import annotations

import contextlib

import asyncio
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from tgserve.api.app import create_app
from tgserve.api.schemas import GenerateResponse, StreamResponse
from tgserve.core.config import ServerConfig
from tgserve.core.engine import GenerationError
from tgserve.core.limits import RuntimeLimits
from tgserve.core.request import Finish, ModelInfo, TokenEvent, TopToken


class CharTokenizer:
    """One token per character."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(map(chr, ids))


class FakeEngine:
    """Echoes the prompt back one character per token, `token_delay_s` apart."""

    def __init__(self, token_delay_s: float = 0.0, error: str | None = None, **config):
        self.config = ServerConfig(**config)
        self.limits = RuntimeLimits(max_input_tokens=64, max_total_tokens=128, max_batch_prefill_tokens=128,
                                    max_batch_total_tokens=1024, max_batch_size=None, num_blocks=65, block_size=16)
        self.model_info = ModelInfo("fake/echo", "abc123", "float32", "cpu", "fake")
        self.tokenizer = CharTokenizer()
        self.is_healthy = True
        self.token_delay_s, self.error = token_delay_s, error
        self.requests, self.cancelled, self.started, self.stopped = [], [], False, False

    def start(self) -> None:
        self.started = True

    def set_observer(self, observer) -> None:
        self.observer = observer  # the app's metrics observer; this fake runs no steps to report

    def shutdown(self, drain_timeout_s: float) -> None:
        self.stopped = True

    async def stream(self, request):
        request_id = len(self.requests)
        self.requests.append(request)
        is_done = False
        try:
            for index in range(1, request.stopping.max_new_tokens + 1):
                await asyncio.sleep(self.token_delay_s)
                if self.error:
                    is_done = True
                    raise GenerationError(self.error)
                token_id = request.input_ids[(index - 1) % len(request.input_ids)]
                is_done = index == request.stopping.max_new_tokens
                finish = Finish("length", index, None, "".join(chr(t) for t in (request.input_ids * index)[:index]),
                                queue_s=0.001, inference_s=0.002) if is_done else None
                yield TokenEvent(token_id, chr(token_id), float("nan") if index == 1 else -0.5, False, index,
                                 top_tokens=(TopToken(token_id, chr(token_id), -0.5, False),) * request.top_n_tokens,
                                 finish=finish)
        finally:
            if not is_done:
                self.cancelled.append(request_id)


def post(client: TestClient, path: str, inputs: str = "abc", **params) -> httpx.Response:
    return client.post(path, json={"inputs": inputs, "parameters": params})


def test_generate_shapes_headers_and_lifespan():
    engine = FakeEngine()
    with TestClient(create_app(engine)) as client:
        assert engine.started
        response = post(client, "/generate", max_new_tokens=4, details=True, top_n_tokens=1, return_full_text=True)
        assert response.status_code == 200
        body = GenerateResponse.model_validate(response.json())
        assert body.generated_text == "abc" + "abca"
        assert body.details.tokens[0].logprob is None  # NaN is written as null
        assert len(body.details.top_tokens) == 4 and body.details.prefill == []
        assert response.headers["x-compute-type"] == "cpu+optimized"
        assert response.headers["x-prompt-tokens"] == "3" and response.headers["x-generated-tokens"] == "4"
        assert response.headers["x-queue-time"] == "1" and response.headers["x-inference-time"] == "2"
        assert "details" not in post(client, "/generate", max_new_tokens=2).json()
    assert engine.stopped


def test_stream_event_shapes():
    with TestClient(create_app(FakeEngine())) as client:
        response = post(client, "/generate_stream", max_new_tokens=3, details=True)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        chunks = [c for c in response.text.split("\n\n") if c]
        assert all(c.startswith("data:{") for c in chunks)
        events = [StreamResponse.model_validate_json(c[len("data:"):]) for c in chunks]
        assert [e.index for e in events] == [1, 2, 3]
        assert "top_tokens" not in chunks[0] and events[0].generated_text is None and events[0].details is None
        assert events[-1].generated_text == "abc" and events[-1].details.input_length == 3


def test_engine_failure_is_424_and_an_event_in_streams():
    with TestClient(create_app(FakeEngine(error="device lost"))) as client:
        response = post(client, "/generate", max_new_tokens=3)
        assert response.status_code == 424
        assert response.json() == {"error": "Request failed during generation: device lost", "error_type": "generation"}
        stream = post(client, "/generate_stream", max_new_tokens=3)
        assert stream.status_code == 200
        assert stream.text == ('data:{"error":"Request failed during generation: device lost",'
                               '"error_type":"generation"}\n\n')


def test_unhealthy_engine_and_payload_limit():
    engine = FakeEngine(payload_limit=100)
    with TestClient(create_app(engine)) as client:
        assert client.get("/health").status_code == 200 and client.get("/health").content == b""
        engine.is_healthy = False
        response = client.get("/health")
        assert response.status_code == 503
        assert response.json() == {"error": "unhealthy", "error_type": "healthcheck"}
        too_big = post(client, "/generate", inputs="x" * 200)
        assert too_big.status_code == 413 and too_big.json()["error_type"] == "payload_limit"


def test_unknown_fields_are_ignored_and_compat_route_wraps_in_a_list():
    with TestClient(create_app(FakeEngine())) as client:
        response = client.post("/", json={"inputs": "ab", "parameters": {"max_new_tokens": 2, "foo": 1}, "bar": 2})
        assert response.status_code == 200
        assert response.json() == [{"generated_text": "abab"}]  # no pipeline tag: return_full_text defaults on


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(engine):
    """A real uvicorn (in a thread) over `engine`; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=free_port(),
                                           log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def live_server():
    """A real uvicorn over a slow fake engine, so a client can hang up mid-stream."""
    engine = FakeEngine(token_delay_s=0.02, max_concurrent_requests=1)
    with serve_in_thread(engine) as url:
        yield engine, url


def test_disconnect_cancels_the_request_and_frees_the_permit(live_server):
    engine, url = live_server
    with httpx.Client(base_url=url, timeout=10) as client:
        body = {"inputs": "abc", "parameters": {"max_new_tokens": 100}}
        with client.stream("POST", "/generate_stream", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data:{")
        deadline = time.monotonic() + 5
        while not engine.cancelled and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.cancelled == [0]
        after = client.post("/generate", json={"inputs": "abc", "parameters": {"max_new_tokens": 2}})
        assert after.status_code == 200  # the permit of the dropped stream was given back


def test_non_streaming_request_is_cancelled_when_the_client_hangs_up(live_server):
    engine, url = live_server
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/generate", json={"inputs": "abc", "parameters": {"max_new_tokens": 100}}, timeout=0.3)
    deadline = time.monotonic() + 3
    while not engine.cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.cancelled == [0]
