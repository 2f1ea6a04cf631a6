"""The OpenAI routes over a scripted engine: the error paths the real model cannot be made to take
(an engine failure, a full limiter) and that a client hanging up on a merged completions stream
cancels every one of its requests and gives their permits back."""
from __future__ import annotations

import json
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from tgserve.api.app import create_app
from tests.api.test_app_fake_engine import CharTokenizer, FakeEngine, serve_in_thread

DONE = "[DONE]"


class ChatCharTokenizer(CharTokenizer):
    """One token per character, and a chat "template" that joins the message contents."""

    chat_template = "joined"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return super().encode(text)

    def apply_chat_template(self, messages, add_generation_prompt=True, continue_final_message=False) -> str:
        return "".join(m["content"] for m in messages)


def chat_engine(**kwargs) -> FakeEngine:
    engine = FakeEngine(**kwargs)
    engine.tokenizer = ChatCharTokenizer()
    return engine


def sse_payloads(text: str) -> list:
    payloads = [line[len("data:"):].strip() for line in text.split("\n") if line.startswith("data:")]
    return [p if p == DONE else json.loads(p) for p in payloads]


def test_engine_failure_is_424_and_an_openai_error_event_in_streams():
    failure = "Request failed during generation: device lost"
    with TestClient(create_app(chat_engine(error="device lost"))) as client:
        chat = {"messages": [{"role": "user", "content": "abc"}], "max_tokens": 3}
        response = client.post("/v1/chat/completions", json=chat)
        assert (response.status_code, response.json()) == (424, {"error": failure, "error_type": "generation"})
        stream = client.post("/v1/chat/completions", json={**chat, "stream": True})
        assert stream.status_code == 200
        assert sse_payloads(stream.text) == [{"error": {"message": failure, "http_status_code": 422}}, DONE]
        completion = client.post("/v1/completions", json={"prompt": ["ab", "cd"], "max_tokens": 3})
        assert completion.status_code == 424 and completion.json()["error_type"] == "generation"


def test_a_full_limiter_is_429_or_an_event_per_prompt():
    with TestClient(create_app(chat_engine(max_concurrent_requests=1, token_delay_s=0.01))) as client:
        body = {"prompt": ["ab", "cd"], "max_tokens": 20, "temperature": 0}
        response = client.post("/v1/completions", json=body)
        assert (response.status_code, response.json()) == (429, {"error": "Model is overloaded",
                                                                 "error_type": "overloaded"})
        events = sse_payloads(client.post("/v1/completions", json={**body, "stream": True}).text)
        assert {"error": {"message": "Model is overloaded", "http_status_code": 422}} in events
        assert events[-1] == DONE and len(events) == 1 + 20 + 1  # one prompt ran, one was refused
        assert client.post("/v1/completions", json={**body, "prompt": "ab"}).status_code == 200  # permits back


def test_completions_join_the_prompts_choices_and_usage():
    with TestClient(create_app(chat_engine())) as client:
        body = client.post("/v1/completions", json={"prompt": ["ab", "xyz"], "max_tokens": 4, "echo": True}).json()
        assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
            (0, "ab" + "abab", "length"), (1, "xyz" + "xyzx", "length")]
        assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}
        assert body["model"] == "fake/echo" and body["object"] == "text_completion"


@pytest.fixture
def live_server():
    """A real uvicorn over a slow fake engine, so a client can hang up mid-stream."""
    engine = chat_engine(token_delay_s=0.02, max_concurrent_requests=2)
    with serve_in_thread(engine) as url:
        yield engine, url


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", {"prompt": ["abc", "def"]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "abc"}]}),
])
def test_hanging_up_cancels_every_request_and_frees_the_permits(live_server, path, body):
    engine, url = live_server
    with httpx.Client(base_url=url, timeout=10) as client:
        with client.stream("POST", path, json={**body, "max_tokens": 100, "stream": True}) as response:
            assert next(response.iter_lines()).startswith("data:{")
        num_requests = len(engine.requests)
        deadline = time.monotonic() + 5
        while len(engine.cancelled) < num_requests and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sorted(engine.cancelled) == list(range(num_requests))
        again = client.post("/v1/completions", json={"prompt": ["ab", "cd"], "max_tokens": 2})
        assert again.status_code == 200  # both permits were given back
