"""Operational layers without a model: request ids in JSON logs, OpenTelemetry spans (in-memory
exporter), the start-up error when OpenTelemetry is missing, the --prometheus-port listener, and
the operational flags' names, defaults and environment variables."""
from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import subprocess
import sys

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tgserve.api.logging_setup import JsonFormatter
from tgserve.api.shared.metrics_http import start_metrics_listener
from tgserve.api.shared.request_id import RequestIdMiddleware
from tgserve.api.shared.tracing import INSTALL_HINT, TracingMiddleware, TracingUnavailable, make_tracer_provider, \
    require_opentelemetry

from .conftest import tgserve_env

log = logging.getLogger("tgserve.tests.operations")


def logged_app() -> FastAPI:
    """An app whose one route logs two lines, behind the request-id middleware."""
    app = FastAPI()

    @app.get("/work")
    async def work() -> dict:
        log.info("first line")
        await asyncio.to_thread(log.info, "second line, from a worker thread")
        return {}

    app.add_middleware(RequestIdMiddleware)
    return app


def test_json_log_lines_carry_one_id_per_request():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with TestClient(logged_app()) as client:
            client.get("/work")
            client.get("/work")
        log.info("outside any request")
    finally:
        log.removeHandler(handler)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    ids = [record.get("request_id") for record in records]
    assert len(ids) == 5 and ids[0] == ids[1] and ids[2] == ids[3] and ids[0] != ids[2] and ids[4] is None
    assert all(len(i) == 32 for i in ids[:4])


def test_spans_per_request_with_status_parent_and_request_id():
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = make_tracer_provider("http://127.0.0.1:1", "my-service", exporter=exporter)
    app = FastAPI()

    @app.post("/generate")
    async def generate() -> dict:
        return {}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("bug")

    app.add_middleware(TracingMiddleware, provider=provider)
    app.add_middleware(RequestIdMiddleware)
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with TestClient(app, raise_server_exceptions=False) as client:
        client.post("/generate", headers={"traceparent": parent})
        client.get("/boom")
        client.get("/metrics")  # not traced
    provider.force_flush()
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert set(spans) == {"generate", "GET /boom"}
    span = spans["generate"]
    assert span.resource.attributes["service.name"] == "my-service"
    assert span.attributes["http.response.status_code"] == 200 and len(span.attributes["request_id"]) == 32
    assert format(span.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert format(span.parent.span_id, "016x") == "b7ad6b7169203331"
    assert not spans["GET /boom"].status.is_ok
    provider.shutdown()


def test_missing_opentelemetry_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    with pytest.raises(TracingUnavailable, match="cannot import opentelemetry.sdk.trace") as error:
        require_opentelemetry()
    assert str(error.value).endswith(INSTALL_HINT)


def test_serve_fails_at_once_without_opentelemetry():
    """`tgserve serve --otlp-endpoint ...` without the SDK: one stderr line, exit 1, nothing loaded."""
    script = ("import sys; sys.modules['opentelemetry.sdk.trace'] = None; from tgserve.api.cli import main; "
              "sys.exit(main(sys.argv[1:]))")
    command = [sys.executable, "-c", script, "serve", "--otlp-endpoint", "http://127.0.0.1:4317"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=tgserve_env())
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "tgserve: error: --otlp-endpoint needs the OpenTelemetry SDK and OTLP exporter (cannot import "
        f"opentelemetry.sdk.trace): {INSTALL_HINT}"]
    assert "Loading" not in result.stdout


def test_metrics_listener_serves_and_a_taken_port_is_only_a_warning(caplog):
    async def main() -> None:
        server = await start_metrics_listener("127.0.0.1", _free_port(), lambda: b"tgi_queue_size 0.0\n")
        assert server is not None
        port = server.sockets[0].getsockname()[1]
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}/metrics")
            assert response.status_code == 200 and response.text == "tgi_queue_size 0.0\n"
            assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
            assert (await client.post(f"http://127.0.0.1:{port}/metrics")).status_code == 405
        with caplog.at_level(logging.WARNING):
            assert await start_metrics_listener("127.0.0.1", port, lambda: b"") is None
        assert await start_metrics_listener("127.0.0.1", 0, lambda: b"") is None
        server.close()
        await server.wait_closed()

    asyncio.run(main())
    assert "Cannot serve metrics on port" in caplog.text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_operational_flags_have_tgi_names_defaults_and_environment_variables():
    from tgserve.api.cli import build_parser
    from tgserve.api.cli_flags import config_from_args
    from tgserve.core.config import ConfigError, ServerConfig

    def config(argv, environ=None):
        return config_from_args(build_parser().parse_args(["serve", *argv]), environ or {})

    defaults = config([])
    assert (defaults.prometheus_port, defaults.api_key, defaults.cors_allow_origin) == (9000, None, ())
    assert (defaults.otlp_endpoint, defaults.otlp_service_name) == (None, "text-generation-inference.router")
    flags = config(["--prometheus-port", "9100", "--api-key", "k", "--cors-allow-origin", "http://a",
                    "--cors-allow-origin", "http://b", "--otlp-endpoint", "http://c:4317", "--otlp-service-name", "s"])
    assert flags == ServerConfig(prometheus_port=9100, api_key="k", cors_allow_origin=("http://a", "http://b"),
                                 otlp_endpoint="http://c:4317", otlp_service_name="s")
    environ = {"PROMETHEUS_PORT": "0", "API_KEY": "e", "CORS_ALLOW_ORIGIN": "http://a, http://b",
               "OTLP_ENDPOINT": "http://c:4317", "OTLP_SERVICE_NAME": "svc"}
    from_env = config([], environ)
    assert from_env == ServerConfig(prometheus_port=0, api_key="e", cors_allow_origin=("http://a", "http://b"),
                                    otlp_endpoint="http://c:4317", otlp_service_name="svc")
    assert config(["--cors-allow-origin", "http://z"], environ).cors_allow_origin == ("http://z",)
    assert "api_key" not in repr(from_env)  # a logged config never shows the key
    with pytest.raises(ConfigError, match="prometheus_port"):
        config(["--prometheus-port", "70000"])
