"""The FastAPI application: TGI's routes (`api.tgi`) and the OpenAI ones (`api.openai`) over one engine.

`create_app(engine)` wires the routes, the error envelope, `--payload-limit` and the operational
layers (`api.shared.middleware`: auth, CORS, tracing, request ids) around an engine that `build_engine`
made, and attaches the engine's step observer that feeds /metrics. Its lifespan starts the engine
loop and the `--prometheus-port` listener and, on shutdown (uvicorn runs it after in-flight
requests drained or --graceful-termination-timeout passed), stops them and flushes traces.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, AsyncIterator

from fastapi import FastAPI

from tgserve.api.openai import routes as openai_routes
from tgserve.api.shared import metrics_http
from tgserve.api.shared.body_limit import BodyLimitMiddleware
from tgserve.api.shared.errors import install_error_handlers
from tgserve.api.shared.metrics_engine import EngineMetrics
from tgserve.api.shared.middleware import install_middleware
from tgserve.api.shared.state import ServerState
from tgserve.api.shared.tracing import make_tracer_provider, shutdown_tracer_provider
from tgserve.api.shared.version import server_version
from tgserve.api.tgi import info as tgi_info
from tgserve.api.tgi import routes as tgi_routes
from tgserve.api.tgi import tokenize as tgi_tokenize

if TYPE_CHECKING:
    from tgserve.core.engine import Engine

logger = logging.getLogger(__name__)

ENGINE_STOP_TIMEOUT_S = 5.0  # uvicorn already waited for in-flight requests before the lifespan ends


def create_app(engine: "Engine") -> FastAPI:
    """Build the app serving `engine`; the engine is started and stopped by the app's lifespan."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        metrics_listener = await metrics_http.start_metrics_listener(config.hostname, config.prometheus_port,
                                                                     state.metrics.render)
        logger.info("Connected")
        try:
            yield
        finally:
            if metrics_listener is not None:
                metrics_listener.close()
            drain_timeout_s = min(ENGINE_STOP_TIMEOUT_S, float(engine.config.graceful_termination_timeout))
            await asyncio.to_thread(engine.shutdown, drain_timeout_s)
            if tracer_provider is not None:
                await asyncio.to_thread(shutdown_tracer_provider, tracer_provider)
            logger.info("engine stopped")

    app = FastAPI(title="tgserve", version=server_version(), lifespan=lifespan,
                  description="Text generation server compatible with Hugging Face TGI",
                  openapi_url="/api-doc/openapi.json", docs_url="/docs", redoc_url=None)
    config = engine.config
    tracer_provider = (make_tracer_provider(config.otlp_endpoint, config.otlp_service_name)
                       if config.otlp_endpoint else None)
    state = app.state.tgserve = ServerState.from_engine(engine)
    engine.set_observer(EngineMetrics(state.metrics))
    install_error_handlers(app)
    app.include_router(tgi_info.router)
    app.include_router(tgi_routes.router)
    app.include_router(openai_routes.router)
    app.include_router(tgi_tokenize.router)
    app.include_router(metrics_http.router)
    app.add_middleware(BodyLimitMiddleware, limit_bytes=engine.config.payload_limit)
    install_middleware(app, config, tracer_provider)
    return app
