"""Rank 0 starts the other ranks of a sharded server on this machine and watches them.

`tgserve serve --num-shard N` is one server, not N processes to babysit: rank 0 (the process the user
started) spawns ranks 1..N-1 (multiprocessing `spawn`: a fresh interpreter each, no forked torch
state), joins the rendezvous with them, and watches their exits on a thread. Until rank 0 says the
ranks are stopping (server shutdown, or a start-up error of its own), any rank's exit is fatal: the
others are killed and `on_lost` gets one line naming the rank and its own error (sent through a pipe
before it exited) or the signal that killed it; `on_lost` ends the server. A rank also exits by
itself when rank 0's process is gone (`shard_worker`), so no rank outlives the server.
"""
from __future__ import annotations

import multiprocessing
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait

from tgserve.core.config import ServerConfig
from tgserve.core.distributed.ranks import Ranks, join_ranks, leave_ranks
from tgserve.core.distributed.shard_worker import rank_main

STOP_GRACE_S = 10.0  # how long stopping ranks may take to exit after SHUTDOWN (or SIGTERM) before SIGKILL


class RankProcesses:
    """Ranks 1..num_shard-1 of `config`, spawned here; rank 0 is the calling process."""

    def __init__(self, config: ServerConfig, log_setup: Callable[[], None], on_lost: Callable[[str], None]):
        """log_setup: picklable, configures logging in each rank process; on_lost: called once, from the
        watching thread, with the message when a rank exits while the server runs (it should end the process)."""
        self.config = config
        self._log_setup = log_setup
        self._on_lost = on_lost
        self._processes: dict[int, multiprocessing.Process] = {}
        self._errors: dict[int, object] = {}  # rank -> read end of its error pipe
        self._is_stopping = threading.Event()
        self._lose_lock = threading.Lock()
        self._is_lost = False

    def start(self, dist_backend: str | None) -> Ranks:
        """Spawn the ranks, join the rendezvous as rank 0 and start watching; returns rank 0's `Ranks`."""
        context = multiprocessing.get_context("spawn")
        for rank in range(1, self.config.num_shard):
            reader, writer = context.Pipe(duplex=False)
            process = context.Process(target=rank_main, args=(self.config, rank, writer, self._log_setup),
                                      name=f"tgserve-rank-{rank}", daemon=True)
            process.start()
            writer.close()  # the rank holds the only write end: its exit closes the pipe
            self._processes[rank], self._errors[rank] = process, reader
        threading.Thread(target=self._watch, name="tgserve-rank-watch", daemon=True).start()
        tp, control_group = join_ranks(0, self.config.num_shard, self.config.master_addr, self.config.master_port,
                                       dist_backend)
        return Ranks(tp, control_group, self._is_stopping.set)

    def stop(self) -> None:
        """Stop watching, let the ranks exit, kill those that do not, leave the groups. Safe to call twice.

        Ranks told to stop (the engine's shutdown sent SHUTDOWN after `Ranks.on_stopping`) get
        STOP_GRACE_S to exit by themselves; ranks never told (rank 0 failed at start, or was interrupted)
        wait for a message that will not come, and are killed at once."""
        grace_s = STOP_GRACE_S if self._is_stopping.is_set() else 0.0
        self._is_stopping.set()
        deadline = time.monotonic() + grace_s
        for process in self._processes.values():
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self._processes.values():
            if process.is_alive():
                process.kill()
                process.join(5.0)
        leave_ranks()

    def report_lost(self, timeout_s: float) -> None:
        """Where a rank exited (or exits within `timeout_s`), report it through `on_lost` now: rank 0's own
        error is then only the echo of the lost rank (a collective whose peer is gone)."""
        by_sentinel = {process.sentinel: rank for rank, process in self._processes.items()}
        ready = wait(list(by_sentinel), timeout_s)
        if ready:
            self._lose(by_sentinel[ready[0]])

    def _watch(self) -> None:
        """Block until a rank exits; unless stopping, kill the rest and report it."""
        by_sentinel = {process.sentinel: rank for rank, process in self._processes.items()}
        ready = wait(list(by_sentinel))
        if not self._is_stopping.is_set():
            self._lose(by_sentinel[ready[0]])

    def _lose(self, rank: int) -> None:
        """Kill the other ranks and hand `on_lost` what ended `rank`, once (the watch thread and
        `report_lost` may both get here; the second waits while the first ends the process)."""
        with self._lose_lock:
            if self._is_lost:
                return
            self._is_lost = True
            self._is_stopping.set()
            message = self._describe(rank)
            for process in self._processes.values():
                if process.is_alive():
                    process.kill()
            for process in self._processes.values():
                process.join(5.0)
            self._on_lost(message)

    def _describe(self, rank: int) -> str:
        """`rank R failed: <its error>`, or how it ended where it could not say (killed by a signal)."""
        process, errors = self._processes[rank], self._errors[rank]
        process.join(1.0)
        try:
            if errors.poll(0.5):
                return f"rank {rank} failed: {errors.recv()}"
        except (EOFError, OSError):
            pass
        code = process.exitcode
        if code is not None and code < 0:
            return f"rank {rank} was killed by {signal.Signals(-code).name}"
        return f"rank {rank} exited with code {code}"
