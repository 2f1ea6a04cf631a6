"""`tgserve serve`: select the backend, build the engine, serve HTTP until SIGTERM/SIGINT.

Start-up failures (an unusable backend, bad limits, a missing model) end the process with one
line on stderr and exit code 1. On SIGTERM or SIGINT uvicorn stops accepting connections, lets
in-flight requests finish for up to --graceful-termination-timeout seconds, then runs the app's
lifespan shutdown, which stops the engine; the process then exits 0.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
from dataclasses import replace

import uvicorn

from tgserve.api.app import create_app
from tgserve.api.cli import fail
from tgserve.api.logging_setup import configure_logging
from tgserve.api.shared.tracing import require_opentelemetry
from tgserve.core.config import ConfigError, ServerConfig, find_num_shards
from tgserve.core.distributed.head_sharding import ShardCountError
from tgserve.core.distributed.rank_processes import RankProcesses
from tgserve.core.engine_builder import start_engine
from tgserve.core.layers.linear import LinearLoadError
from tgserve.core.model_source import ModelNotFound
from tgserve.core.plugins import BackendRegistry, BackendUnavailable

logger = logging.getLogger(__name__)

STARTUP_ERRORS = (ConfigError, BackendUnavailable, ModelNotFound, OSError, LinearLoadError, ShardCountError)
_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RANK_LOG_LEVEL = "WARNING"  # the other ranks log only what goes wrong: rank 0 tells the story once


def run_server(config: ServerConfig) -> int:
    """Serve `config` until a termination signal; return the process exit code.

    With `--num-shard N` (N > 1) this process is rank 0: it starts ranks 1..N-1 itself and stops them
    with the server; a rank that fails or dies ends the server with exit code 1 and its message."""
    processes = None
    with contextlib.ExitStack() as stack:
        try:
            if config.otlp_endpoint:
                require_opentelemetry()  # fail before the model loads: the user asked for tracing
            backend = BackendRegistry().select(config.backend)
            logger.info("Backend: %s (%s)", backend.name, backend.status.device_name)
            config = replace(config, num_shard=find_num_shards(config.sharded, config.num_shard,
                                                               backend.hook.tgserve_get_device_count()))
            ranks = None
            if config.num_shard > 1:
                logger.info("Sharding model on %d processes", config.num_shard)  # TGI's launcher line
                processes = RankProcesses(config, functools.partial(configure_logging, config.json_output,
                                                                    RANK_LOG_LEVEL), _exit_on_lost_rank)
                stack.callback(processes.stop)
                ranks = processes.start(backend.hook.tgserve_get_dist_backend())
            # Progress bars only for a person watching a terminal: never in logs or JSON output.
            engine = start_engine(config, backend, progress=sys.stderr.isatty() and not config.json_output,
                                  ranks=ranks)
        except STARTUP_ERRORS as error:
            return fail(error)
        except Exception:
            if processes is not None:  # a rank that died makes rank 0's collectives fail: say which one
                processes.report_lost(timeout_s=2.0)
            raise
        server = uvicorn.Server(uvicorn.Config(
            create_app(engine), host=config.hostname, port=config.port, log_config=None, access_log=False,
            lifespan="on", timeout_graceful_shutdown=config.graceful_termination_timeout))
        _serve_until_signal(server)
    return 0 if server.started else 1


def _exit_on_lost_rank(message: str) -> None:
    """A rank of a serving (or starting) sharded server is gone: the model cannot step without it, so
    the server ends now, with the rank's own message, rather than answering 424 to every request."""
    logger.error("%s; stopping the server", message)
    fail(message)
    logging.shutdown()
    os._exit(1)


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
