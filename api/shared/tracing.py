"""`--otlp-endpoint`: one OpenTelemetry span per HTTP request, exported over OTLP/gRPC as TGI does.

OpenTelemetry is an optional dependency. Asking for tracing without it installed is a start-up
error naming what to install (`require_opentelemetry`), never a silently untraced server. Spans
carry TGI's handler names (`generate`, `generate_stream`, `compat_generate`, ...), the HTTP method,
route, status code and the request id the logs use; an incoming W3C `traceparent` header makes
the span a child of the caller's trace. /metrics scrapes are not traced.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tgserve.api.shared.request_id import current_request_id
from tgserve.core.config import ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

INSTALL_HINT = "pip install opentelemetry-sdk opentelemetry-exporter-otlp"
UNTRACED_PATHS = frozenset({"/metrics"})
FLUSH_TIMEOUT_S = 5.0  # how long shutdown waits for the last spans to reach the collector
# TGI's span (handler) names for its routes; anything else is named "METHOD /path".
SPAN_NAMES = {("POST", "/"): "compat_generate", ("POST", "/generate"): "generate",
              ("POST", "/generate_stream"): "generate_stream", ("POST", "/v1/chat/completions"): "chat_completions",
              ("POST", "/v1/completions"): "completions", ("POST", "/tokenize"): "tokenize",
              ("POST", "/vertex"): "vertex_compatibility", ("POST", "/invocations"): "sagemaker_compatibility",
              ("GET", "/health"): "health", ("GET", "/info"): "get_model_info"}


class TracingUnavailable(ConfigError):
    """--otlp-endpoint was given but the OpenTelemetry packages are not installed."""


def require_opentelemetry() -> None:
    """Raise `TracingUnavailable`, naming the pip command, unless the SDK and OTLP exporter import."""
    try:
        import opentelemetry.exporter.otlp.proto.grpc.trace_exporter  # noqa: F401
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as error:
        missing = error.name or "opentelemetry"
        raise TracingUnavailable(f"--otlp-endpoint needs the OpenTelemetry SDK and OTLP exporter "
                                 f"(cannot import {missing}): {INSTALL_HINT}") from None


def make_tracer_provider(endpoint: str, service_name: str, exporter: "SpanExporter | None" = None) -> "TracerProvider":
    """A provider batching spans to the OTLP/gRPC collector at `endpoint` (or to `exporter`, for tests)."""
    require_opentelemetry()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}), shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(exporter or OTLPSpanExporter(endpoint=endpoint)))
    return provider


def shutdown_tracer_provider(provider: "TracerProvider", timeout_s: float = FLUSH_TIMEOUT_S) -> None:
    """Flush and stop `provider`, giving up after `timeout_s` (an unreachable collector must not hang exit)."""
    flusher = threading.Thread(target=provider.shutdown, name="tgserve-otlp-flush", daemon=True)
    flusher.start()
    flusher.join(timeout_s)


class TracingMiddleware:
    """Pure ASGI middleware: a SERVER span around each HTTP request, streamed bodies included."""

    def __init__(self, app: ASGIApp, provider: "TracerProvider"):
        self.app = app
        self.tracer = provider.get_tracer("tgserve.api")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNTRACED_PATHS:
            await self.app(scope, receive, send)
            return
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind, Status, StatusCode

        method, path = scope["method"], scope["path"]
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        attributes = {"http.request.method": method, "url.path": path, "request_id": current_request_id() or ""}
        with self.tracer.start_as_current_span(SPAN_NAMES.get((method, path), f"{method} {path}"),
                                               context=propagate.extract(headers), kind=SpanKind.SERVER,
                                               attributes=attributes) as span:

            async def send_traced(message: Message) -> None:
                if message["type"] == "http.response.start":
                    span.set_attribute("http.response.status_code", message["status"])
                    if message["status"] >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                await send(message)

            await self.app(scope, receive, send_traced)
