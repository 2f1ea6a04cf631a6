"""`--api-key` and `--cors-allow-origin` over the app (scripted engine): which routes need the key,
TGI's case-insensitive comparison and bare 401, and CORS preflights and headers."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tgserve.api.app import create_app

from .fake_engine import FakeEngine

GENERATE_BODY = {"inputs": "abc", "parameters": {"max_new_tokens": 2}}
PROTECTED = ("/", "/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions", "/tokenize",
             "/vertex", "/invocations")


@pytest.fixture(scope="module")
def client():
    """An app with --api-key Secret and two allowed origins."""
    engine = FakeEngine(api_key="Secret", cors_allow_origin=("http://a.example", "http://b.example"),
                        prometheus_port=0)
    with TestClient(create_app(engine), raise_server_exceptions=False) as client:  # the fake has no chat template
        yield client


@pytest.mark.parametrize("path", PROTECTED)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Secret", "Basic Secret", "Bearer Secret2"])
def test_generation_routes_need_the_key(client, path, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    response = client.post(path, json=GENERATE_BODY, headers=headers)
    assert response.status_code == 401 and response.content == b""


@pytest.mark.parametrize("authorization", ["Bearer Secret", "bearer secret", "BEARER SECRET"])
def test_key_is_compared_case_insensitively(client, authorization):
    response = client.post("/generate", json=GENERATE_BODY, headers={"Authorization": authorization})
    assert response.status_code == 200 and response.json()["generated_text"] == "ab"


def test_service_routes_stay_open(client):
    for path in ("/info", "/health", "/metrics", "/"):
        assert client.get(path).status_code == 200, path
    assert client.get("/v1/models").status_code != 401
    assert client.post("/chat_tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).status_code != 401


def test_no_key_means_open_routes_and_any_origin():
    with TestClient(create_app(FakeEngine(prometheus_port=0))) as client:
        response = client.post("/generate", json=GENERATE_BODY, headers={"Origin": "http://anywhere.example"})
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "*"


def test_cors_preflight_answers_before_auth(client):
    headers = {"Origin": "http://b.example", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "content-type"}
    response = client.options("/generate", headers=headers)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "http://b.example"
    assert set(response.headers["access-control-allow-methods"].replace(" ", "").split(",")) == {"GET", "POST"}
    assert "content-type" in response.headers["access-control-allow-headers"].lower()


def test_cors_refuses_other_origins(client):
    headers = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    assert client.options("/generate", headers=headers).status_code == 400
    response = client.get("/info", headers={"Origin": "http://evil.example"})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
    allowed = client.post("/generate", json=GENERATE_BODY,
                          headers={"Origin": "http://a.example", "Authorization": "Bearer Secret"})
    assert allowed.headers["access-control-allow-origin"] == "http://a.example"


def test_a_refused_request_still_gets_cors_headers(client):
    """A browser must be able to read the 401, so the CORS layer wraps the auth check."""
    response = client.post("/generate", json=GENERATE_BODY, headers={"Origin": "http://a.example"})
    assert response.status_code == 401 and response.headers["access-control-allow-origin"] == "http://a.example"
