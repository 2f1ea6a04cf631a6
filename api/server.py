"""`tgserve serve`: select the backend, build the engine, serve HTTP until SIGTERM/SIGINT.

Start-up failures (an unusable backend, bad limits, a missing model) end the process with one
line on stderr and exit code 1. On SIGTERM or SIGINT uvicorn stops accepting connections, lets
in-flight requests finish for up to --graceful-termination-timeout seconds, then runs the app's
lifespan shutdown, which stops the engine; the process then exits 0.
"""
from __future__ import annotations

import logging
import signal
import sys

import uvicorn

from tgserve.api.app import create_app
from tgserve.api.cli import fail
from tgserve.api.shared.tracing import require_opentelemetry
from tgserve.core.config import ConfigError, ServerConfig
from tgserve.core.engine_builder import start_engine
from tgserve.core.layers.linear import LinearLoadError
from tgserve.core.model_source import ModelNotFound
from tgserve.core.plugins import BackendRegistry, BackendUnavailable

logger = logging.getLogger(__name__)

STARTUP_ERRORS = (ConfigError, BackendUnavailable, ModelNotFound, OSError, LinearLoadError)
_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run_server(config: ServerConfig) -> int:
    """Serve `config` until a termination signal; return the process exit code."""
    try:
        if config.otlp_endpoint:
            require_opentelemetry()  # fail before the model loads: the user asked for tracing
        backend = BackendRegistry().select(config.backend)
        logger.info("Backend: %s (%s)", backend.name, backend.status.device_name)
        # Progress bars only for a person watching a terminal: never in logs or JSON output.
        engine = start_engine(config, backend, progress=sys.stderr.isatty() and not config.json_output)
    except STARTUP_ERRORS as error:
        return fail(error)
    server = uvicorn.Server(uvicorn.Config(
        create_app(engine), host=config.hostname, port=config.port, log_config=None, access_log=False,
        lifespan="on", timeout_graceful_shutdown=config.graceful_termination_timeout))
    _serve_until_signal(server)
    return 0 if server.started else 1


def _serve_until_signal(server: uvicorn.Server) -> None:
    """Run uvicorn; absorb the signal it re-raises after its graceful shutdown so we exit 0.

    uvicorn installs its own handlers while serving, restores the previous ones afterwards and
    then re-raises the captured signal; the no-op handlers installed here receive it, and the
    default handlers come back once the server has stopped.
    """
    previous = {sig: signal.signal(sig, _ignore_signal) for sig in _HANDLED_SIGNALS}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ignore_signal(signum: int, _frame: object) -> None:
    logger.info("graceful shutdown after %s complete", signal.Signals(signum).name)
