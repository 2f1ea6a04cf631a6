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
from tgserve.core.distributed.launch import TorchrunRank, plan_launch
from tgserve.core.distributed.rank_processes import RankProcesses
from tgserve.core.distributed.shard_worker import RankZeroLost, serve_rank_group
from tgserve.core.engine_builder import start_engine
from tgserve.core.layers.linear import LinearLoadError
from tgserve.core.model_source import ModelNotFound
from tgserve.core.plugins import BackendRegistry, BackendUnavailable

logger = logging.getLogger(__name__)

STARTUP_ERRORS = (ConfigError, BackendUnavailable, ModelNotFound, OSError, LinearLoadError, ShardCountError)
_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RANK_LOG_LEVEL = "WARNING"  # the other ranks log only what goes wrong: rank 0 tells the story once


def run_server(config: ServerConfig, torchrun: TorchrunRank | None = None) -> int:
    """Serve `config` until a termination signal; return the process exit code.

    With `--num-shard N` (N > 1) this process is rank 0: it starts ranks 1..N-1 itself and stops them
    with the server; a rank that fails or dies ends the server with exit code 1 and its message.
    Across machines (`--nnodes` / `--node-rank`, or a rank torchrun started: `torchrun`) only rank 0
    serves; another process runs its ranks' steps until rank 0 stops them (`_run_rank_group`)."""
    processes = None
    with contextlib.ExitStack() as stack:
        try:
            if config.otlp_endpoint:
                require_opentelemetry()  # fail before the model loads: the user asked for tracing
            backend = BackendRegistry().select(config.backend)
            logger.info("Backend: %s (%s)", backend.name, backend.status.device_name)
            num_shard = config.num_shard if config.num_shard is not None or torchrun is None else torchrun.world_size
            config = replace(config, num_shard=find_num_shards(config.sharded, num_shard,
                                                               backend.hook.tgserve_get_device_count()))
            launch = plan_launch(config.num_shard, config.nnodes, config.node_rank, torchrun)
            ranks = None
            if config.num_shard > 1:
                if launch.is_serving:
                    logger.info("Sharding model on %d processes", config.num_shard)  # TGI's launcher line
                backend.hook.tgserve_on_sharding(world_size=config.num_shard, num_local_ranks=launch.num_local_ranks)
                processes = RankProcesses(config, launch, functools.partial(configure_logging, config.json_output,
                                                                            RANK_LOG_LEVEL), _exit_on_lost_rank)
                stack.callback(processes.stop)
                ranks = processes.start(backend.hook.tgserve_get_dist_backend())
            if not launch.is_serving:
                return _run_rank_group(config, backend, ranks, launch.local_rank(launch.first_rank))
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


def _run_rank_group(config: ServerConfig, backend, ranks, local_rank: int) -> int:
    """A process whose first rank is not 0: serve rank 0's steps until it says stop (exit 0), or exit 1
    naming what went wrong when rank 0's server is gone. SIGTERM / Ctrl-C are rank 0's to handle:
    this process stops when rank 0 sends SHUTDOWN (torchrun passes its SIGTERM to every rank)."""
    for sig in _HANDLED_SIGNALS:  # rank 0 drains on SIGTERM, then its SHUTDOWN ends this process (exit 0)
        signal.signal(sig, signal.SIG_IGN)
    logger.info("rank %d of %d: following rank 0 at %s:%d", ranks.tp.rank, config.num_shard, config.master_addr,
                config.master_port)
    try:
        serve_rank_group(config, backend, ranks, local_rank)
    except RankZeroLost as error:
        return fail(error)
    return 0


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
