"""Operations against one real `tgserve serve` process started with every operational flag:
--api-key, --cors-allow-origin (twice), --json-output, --otlp-endpoint (a local OTLP/gRPC collector
in this test), --otlp-service-name and --prometheus-port. Raw httpx throughout.

The metrics test reads TGI's Grafana dashboard (`data/tgi-grafana-dashboard.json`, a copy of TGI's
`assets/tgi_grafana.json`, Apache-2.0) and checks that every series its PromQL names is exported, and
moved once requests flowed; a client that hangs up mid-stream must leave the batch (and count as
dropped) long before its request could have run to its end.
"""
from __future__ import annotations

import json
import re
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_service
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as trace_service_grpc

from .conftest import free_port
from .metrics_scrape import is_idle, num_decode_steps, num_dropped, scrape, value, wait_for_metrics

DASHBOARD = Path(__file__).parent / "data" / "tgi-grafana-dashboard.json"
API_KEY = "Sesame-42"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ORIGINS = ("http://a.example", "http://b.example")
SERVICE_NAME = "tgserve-e2e"
LONG_STREAM = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 1000, "details": True}}
SERIES = re.compile(r"(tgi_[a-z_]+)(\{[^}]*\})?")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


class Collector(trace_service_grpc.TraceServiceServicer):
    """A minimal OTLP/gRPC trace collector: keeps (service.name, span name, attributes) of every span."""

    def __init__(self):
        self.spans: list[tuple[str, str, dict]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 (the gRPC method's name)
        with self.lock:
            for resource_spans in request.resource_spans:
                resource = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        attributes = {kv.key: kv.value for kv in span.attributes}
                        self.spans.append((resource.get("service.name"), span.name, attributes))
        return trace_service.ExportTraceServiceResponse()


@pytest.fixture(scope="module")
def collector():
    servicer = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_grpc.add_TraceServiceServicer_to_server(servicer, server)
    servicer.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer
    server.stop(grace=None)


@pytest.fixture(scope="module")
def server(collector, start_server):
    """The server; `collector` first, so it outlives the server and receives the spans flushed at exit."""
    prometheus_port = free_port()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")  # export spans every 200 ms instead of every 5 s
        server = start_server(
            "--api-key", API_KEY, "--cors-allow-origin", ORIGINS[0], "--cors-allow-origin", ORIGINS[1],
            "--json-output", "--otlp-endpoint", f"http://127.0.0.1:{collector.port}",
            "--otlp-service-name", SERVICE_NAME, "--prometheus-port", str(prometheus_port))
    server.prometheus_url = f"http://127.0.0.1:{prometheus_port}"
    return server


def dashboard_series() -> set[tuple[str, frozenset]]:
    """Every (metric name, label matchers other than `container`) the dashboard's queries use."""
    found = set()

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr":
                    for name, labels in SERIES.findall(value):
                        matchers = frozenset((k, v) for k, v in re.findall(r'(\w+)="([^"]*)"', labels)
                                             if k != "container")
                        found.add((name, matchers))
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(DASHBOARD.read_text()))
    return found


def test_every_dashboard_series_is_exported_and_moves(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as client:
        with client.stream("POST", "/generate_stream", json=LONG_STREAM) as stream:
            events = (line for line in stream.iter_lines() if line.startswith("data:"))
            next(events), next(events)
            # Joins the running batch (a concat); the stream is then dropped mid-way.
            joined = client.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}})
            assert joined.status_code == 200
        assert client.post("/generate", json={"inputs": "", "parameters": {}}).status_code == 422
    series = dashboard_series()
    assert len(series) >= 20
    samples, types = scrape(server.url)
    for name, matchers in sorted(series):
        family = name if name in types else re.sub(r"_(bucket|sum|count)$", "", name)
        assert family in types, f"{name} (dashboard) is not exported"
        assert any(n == name and matchers <= ls for n, ls in samples), f"no {name}{set(matchers)} sample"
        if types[family] == "counter":
            assert value(samples, name, **dict(matchers)) > 0, f"{name}{set(matchers)} never moved"
        elif types[family] == "histogram":
            assert value(samples, family + "_count", **dict(matchers)) > 0, f"{family}{set(matchers)} never moved"
    assert value(samples, "tgi_request_failure", err="validation") >= 1
    assert value(samples, "tgi_batch_max_total_tokens") == 32768  # the tests' --max-batch-total-tokens
    second, _ = scrape(server.prometheus_url)  # --prometheus-port serves the same families
    assert {n for n, _ in second} == {n for n, _ in samples}


def test_client_disconnect_drops_the_request_and_empties_the_batch(server):
    before = wait_for_metrics(server.url, is_idle, "an earlier test's requests left the batch")
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as client:
        with client.stream("POST", "/generate_stream", json=LONG_STREAM) as stream:
            events = (line for line in stream.iter_lines() if line.startswith("data:"))
            for _ in range(3):
                next(events)
            during, _ = scrape(server.url)
            assert value(during, "tgi_batch_current_size") == 1
    after = wait_for_metrics(server.url, lambda s: is_idle(s) and num_dropped(s) > num_dropped(before),
                             "the closed stream counted as dropped and out of the batch")
    assert num_dropped(after) == num_dropped(before) + 1
    assert value(after, "tgi_batch_current_max_tokens") == 0
    # Dropped, not run to its end: the demo model never stops this prompt early (it ran 1000 of 1000
    # tokens), so running on after the hang-up would take all 999 decode steps.
    num_steps = num_decode_steps(after) - num_decode_steps(before)
    assert num_steps < LONG_STREAM["parameters"]["max_new_tokens"] - 1, "the dropped stream ran to its end"


@pytest.mark.parametrize("path", ["/", "/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions",
                                  "/tokenize", "/vertex", "/invocations"])
def test_generation_routes_refuse_a_missing_or_wrong_key(server, path):
    """TGI compares the whole header with "Bearer <key>": no scheme, another scheme or a longer key fail."""
    wrong = (None, "Bearer nope", API_KEY, f"Basic {API_KEY}", f"Bearer {API_KEY}2")
    for authorization in wrong:
        headers = {} if authorization is None else {"Authorization": authorization}
        response = httpx.post(f"{server.url}{path}", json={"inputs": "Hi"}, headers=headers, timeout=30)
        assert response.status_code == 401 and response.content == b"", authorization


@pytest.mark.parametrize("authorization", [f"Bearer {API_KEY}", f"bearer {API_KEY.lower()}",
                                           f"BEARER {API_KEY.upper()}"])
def test_key_opens_generation_and_service_routes_need_none(server, authorization):
    """TGI lowercases both sides before comparing, so the key's case does not matter."""
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
    response = httpx.post(f"{server.url}/generate", json=body, headers={"Authorization": authorization}, timeout=60)
    assert response.status_code == 200 and response.json()["generated_text"]
    for path in ("/info", "/health", "/metrics", "/v1/models"):
        assert httpx.get(f"{server.url}{path}", timeout=30).status_code == 200, path
    chat_tokenize = httpx.post(f"{server.url}/chat_tokenize", json={"messages": [{"role": "user", "content": "hi"}]},
                               timeout=30)
    assert chat_tokenize.status_code == 200


def test_a_refused_request_still_gets_cors_headers(server):
    """A browser must be able to read the 401, so the CORS layer wraps the key check."""
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
    refused = httpx.post(f"{server.url}/generate", json=body, headers={"Origin": ORIGINS[0]}, timeout=30)
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGINS[0]
    allowed = httpx.post(f"{server.url}/generate", json=body, headers={"Origin": ORIGINS[1], **AUTH}, timeout=60)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGINS[1]


def test_cors_preflight_and_headers(server):
    preflight = {"Origin": ORIGINS[1], "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    response = httpx.options(f"{server.url}/generate", headers=preflight, timeout=30)
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == ORIGINS[1]
    assert {m.strip() for m in response.headers["access-control-allow-methods"].split(",")} == {"GET", "POST"}
    refused = httpx.options(f"{server.url}/generate", headers={**preflight, "Origin": "http://evil.example"})
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    info = httpx.get(f"{server.url}/info", headers={"Origin": ORIGINS[0]}, timeout=30)
    assert info.headers["access-control-allow-origin"] == ORIGINS[0]


def test_json_logs_name_each_request(server):
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
    for path in ("/generate", "/generate_stream"):
        assert httpx.post(f"{server.url}{path}", json=body, headers=AUTH, timeout=60).status_code == 200
    records = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    successes = [r for r in records if r["message"].startswith("Success")]
    ids = [r.get("request_id") for r in successes]
    assert len(ids) >= 2 and all(ids) and len(set(ids)) == len(ids)
    assert all("request_id" not in r for r in records if r["message"] == "Connected")  # not about a request


def test_otlp_spans_reach_the_collector(server, collector):
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
    assert httpx.post(f"{server.url}/generate", json=body, headers=AUTH, timeout=60).status_code == 200
    assert httpx.post(f"{server.url}/generate", json=body, timeout=60).status_code == 401
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with collector.lock:
            spans = [s for s in collector.spans if s[1] == "generate"]
        if len(spans) >= 2:
            break
        time.sleep(0.1)
    assert {service for service, _, _ in spans} == {SERVICE_NAME}
    statuses = {attributes["http.response.status_code"].int_value for _, _, attributes in spans}
    assert {200, 401} <= statuses
