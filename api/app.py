"""The FastAPI application: TGI's routes over one engine.

`create_app(engine)` wires the routes, the error envelope and `--payload-limit` around an engine
that `build_engine` made. Its lifespan starts the engine loop and, on shutdown (uvicorn runs it
after in-flight requests drained or --graceful-termination-timeout passed), stops it.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, AsyncIterator

from fastapi import FastAPI

from tgserve.api import routes_generate, routes_info
from tgserve.api.body_limit import BodyLimitMiddleware
from tgserve.api.errors import install_error_handlers
from tgserve.api.routes_info import server_version
from tgserve.api.state import ServerState

if TYPE_CHECKING:
    from tgserve.core.engine import Engine

logger = logging.getLogger(__name__)

ENGINE_STOP_TIMEOUT_S = 5.0  # uvicorn already waited for in-flight requests before the lifespan ends


def create_app(engine: "Engine") -> FastAPI:
    """Build the app serving `engine`; the engine is started and stopped by the app's lifespan."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        logger.info("Connected")
        try:
            yield
        finally:
            drain_timeout_s = min(ENGINE_STOP_TIMEOUT_S, float(engine.config.graceful_termination_timeout))
            await asyncio.to_thread(engine.shutdown, drain_timeout_s)
            logger.info("engine stopped")

    app = FastAPI(title="tgserve", version=server_version(), lifespan=lifespan,
                  description="Text generation server compatible with Hugging Face TGI",
                  openapi_url="/api-doc/openapi.json", docs_url="/docs", redoc_url=None)
    app.state.tgserve = ServerState.from_engine(engine)
    install_error_handlers(app)
    app.include_router(routes_info.router)
    app.include_router(routes_generate.router)
    app.add_middleware(BodyLimitMiddleware, limit_bytes=engine.config.payload_limit)
    return app
