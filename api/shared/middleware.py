"""The ASGI layers around the routes, in one place and in one order.

From the outside in: request id (so every log line, the auth refusal's included, names it),
tracing (one span per request), CORS (answers preflights before anything else looks at them),
`--api-key`, then `--payload-limit` (added by `create_app`) and the routes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from tgserve.api.shared.auth import ApiKeyMiddleware
from tgserve.api.shared.request_id import RequestIdMiddleware
from tgserve.api.shared.tracing import TracingMiddleware
from tgserve.core.config import ServerConfig

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

CORS_METHODS = ("GET", "POST")  # TGI's CorsLayer
CORS_HEADERS = ("content-type",)


def install_middleware(app: FastAPI, config: ServerConfig, tracer_provider: "TracerProvider | None") -> None:
    """Wrap `app` in the layers its flags ask for. Call after the app's other middleware was added.

    Starlette runs the middleware added last first, hence the inside-out order below.
    """
    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)
    # TGI always has a CORS layer: the listed origins, or any origin when none is given.
    app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_allow_origin) or ["*"],
                       allow_methods=list(CORS_METHODS), allow_headers=list(CORS_HEADERS))
    if tracer_provider is not None:
        app.add_middleware(TracingMiddleware, provider=tracer_provider)
    app.add_middleware(RequestIdMiddleware)
