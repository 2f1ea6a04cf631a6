"""A rank other than 0: build this rank's shard of the model, then run every forward rank 0 runs.

Rank 0 owns HTTP, the scheduler and sampling; the other ranks own nothing but their shard. Their
whole life is `serve_steps`: wait for rank 0's next message (`step_broadcast`), allocate the KV cache
it names, or run the step's forward and the same logits calls rank 0 makes (prompt-logprob rows
first, then the sampled rows: `compute_logits` gathers to rank 0, so every rank must call it as
often as rank 0 does), until rank 0 says to stop. Start-up's probe and warmup steps are ordinary
messages, so the loop needs to know nothing about them.

`rank_main` is the entry of a rank process that `rank_processes.RankProcesses` spawned: it reports
its own error to its parent through a pipe before it exits, and exits when its parent is gone.
`serve_rank_group` is the same loop in a `tgserve serve` process that is not rank 0 (another
machine's, or one torchrun started, `launch`): it tells rank 0 its exit is planned (`liveness`).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

import torch

from tgserve.core.config import ServerConfig
from tgserve.core.distributed.launch import RankLaunch
from tgserve.core.distributed.liveness import say_goodbye
from tgserve.core.distributed.ranks import Ranks, join_ranks, leave_ranks
from tgserve.core.distributed.step_broadcast import MessageKind, StepMessage, StepReceiver
from tgserve.core.model_loading import LoadedModel, load_shard
from tgserve.core.plugins import ActiveBackend, BackendRegistry

log = logging.getLogger(__name__)
PARENT_POLL_S = 1.0  # how often a rank checks that the server process that spawned it still runs


class RankZeroLost(RuntimeError):
    """A rank's peers went away while it waited for or ran a step (rank 0's server died or was killed)."""


@torch.inference_mode()
def serve_steps(receiver: StepReceiver, loaded: LoadedModel, make_kv_cache: Callable) -> int:
    """Follow rank 0's messages until SHUTDOWN; returns the steps run.

    loaded: this rank's shard (`load_shard`); make_kv_cache: the backend's
    `tgserve_make_kv_cache` hook (called with its keyword arguments)."""
    kv_cache, num_steps = None, 0
    while True:
        message = receiver.receive()
        if message.kind is MessageKind.SHUTDOWN:
            return num_steps
        if message.kind is MessageKind.KV_CACHE:
            kv_cache = None  # the previous cache (the probe's scratch one) goes before the next is allocated
            kv_cache = make_kv_cache(num_blocks=message.num_blocks, block_size=loaded.block_size,
                                     model_config=loaded.local_config, device=loaded.device, dtype=loaded.dtype)
            continue
        _run_step(loaded, kv_cache, message)
        num_steps += 1


def _run_step(loaded: LoadedModel, kv_cache, message: StepMessage) -> None:
    """Rank 0's `ModelRunner.execute` without sampling: forward, then its logits calls in its order."""
    batch, model = message.batch, loaded.model
    kv_cache.initialize_blocks(message.max_block_id)
    batch.attention = loaded.attention.prepare(batch)
    hidden = model.forward(batch, kv_cache)
    if message.prompt_rows.numel():
        model.compute_logits(hidden[message.prompt_rows])
    if batch.logits_indices.numel():
        model.compute_logits(hidden.index_select(0, batch.logits_indices))


def rank_main(config: ServerConfig, launch: RankLaunch, rank: int, errors, log_setup: Callable[[], None]) -> None:
    """Entry of a spawned rank process: join, load the shard, serve steps, exit 0 on SHUTDOWN.

    errors: the write end of a pipe to its parent's supervisor, which gets one line ("ErrorType:
    message") when this rank fails; log_setup: configures logging in this fresh process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: rank 0 alone decides
    _exit_with_parent()
    log_setup()
    try:
        backend = BackendRegistry().select(config.backend)
        tp, control_group, _ = join_ranks(rank, launch.world_size, config.master_addr, config.master_port,
                                          backend.hook.tgserve_get_dist_backend(), launch.watched_ranks)
        loaded = load_shard(config, backend, tp, launch.local_rank(rank))
        num_steps = serve_steps(StepReceiver(tp, control_group, loaded.device), loaded,
                                backend.hook.tgserve_make_kv_cache)
        log.debug("rank %d: %d steps, stopping", rank, num_steps)
        leave_ranks()
    except BaseException as error:
        errors.send(f"{type(error).__name__}: {error}")
        log.debug("rank %d failed", rank, exc_info=True)
        raise SystemExit(1) from None


def serve_rank_group(config: ServerConfig, backend: ActiveBackend, ranks: Ranks, local_rank: int) -> None:
    """A `tgserve serve` process that is not rank 0 (another machine's first rank, or a rank torchrun
    started), after it joined: load its shard, follow rank 0's steps until SHUTDOWN, and tell rank 0
    the exit is planned. Raises RankZeroLost when rank 0's server is gone."""
    loaded = load_shard(config, backend, ranks.tp, local_rank)
    try:
        num_steps = serve_steps(StepReceiver(ranks.tp, ranks.control_group, loaded.device), loaded,
                                backend.hook.tgserve_make_kv_cache)
    except RuntimeError as error:  # gloo: a peer's sockets closed, or a collective timed out
        raise RankZeroLost(f"rank {ranks.tp.rank}: the server's rank 0 (or another rank) is gone: "
                           f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    ranks.on_stopping()
    log.info("rank %d: %d steps, stopping", ranks.tp.rank, num_steps)
    if ranks.liveness_group is not None:
        say_goodbye(ranks.liveness_group)


def _exit_with_parent() -> None:
    """End this process when the server that spawned it is gone (SIGKILL leaves no chance to stop us)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="tgserve-parent-watch", daemon=True).start()
