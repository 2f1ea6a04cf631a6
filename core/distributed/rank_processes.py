"""A process of a sharded server starts the ranks it owns on this machine and watches them.

`tgserve serve --num-shard N` is one server, not N processes to babysit: rank 0 (the process the user
started) spawns ranks 1..N-1 (multiprocessing `spawn`: a fresh interpreter each, no forked torch
state), joins the rendezvous with them, and watches their exits on a thread. Across machines
(`launch`) each machine's `tgserve serve` does the same for its own ranks, and rank 0 also watches
the other machines' first ranks over the network (`liveness`). Until the process says the ranks are
stopping (server shutdown, or a start-up error of its own), any watched rank's exit is fatal: the
spawned ranks are killed and `on_lost` gets one line naming the rank and its own error (sent through
a pipe before it exited) or the signal that killed it; `on_lost` ends the process. A spawned rank also
exits by itself when its parent process is gone (`shard_worker`), so no rank outlives the server.
"""
from __future__ import annotations

import multiprocessing
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait

from tgserve.core.config import ServerConfig
from tgserve.core.distributed.launch import RankLaunch
from tgserve.core.distributed.liveness import watch_ranks
from tgserve.core.distributed.ranks import Ranks, join_ranks, leave_ranks
from tgserve.core.distributed.shard_worker import rank_main

STOP_GRACE_S = 10.0  # how long stopping ranks may take to exit after SHUTDOWN (or SIGTERM) before SIGKILL


class RankProcesses:
    """The ranks `launch` says this process starts (spawned here); the calling process is launch.first_rank."""

    def __init__(self, config: ServerConfig, launch: RankLaunch, log_setup: Callable[[], None],
                 on_lost: Callable[[str], None]):
        """log_setup: picklable, configures logging in each rank process; on_lost: called once, from a
        watching thread, with the message when a rank exits while the server runs (it should end the process)."""
        self.config = config
        self.launch = launch
        self._log_setup = log_setup
        self._on_lost = on_lost
        self._processes: dict[int, multiprocessing.Process] = {}
        self._errors: dict[int, object] = {}  # rank -> read end of its error pipe
        self._is_stopping = threading.Event()
        self._lose_lock = threading.Lock()
        self._is_lost = False
        self._remote_watches: list[threading.Thread] = []  # rank 0: one per rank watched over the network

    def start(self, dist_backend: str | None) -> Ranks:
        """Spawn the ranks, join the rendezvous as launch.first_rank and start watching; returns its `Ranks`."""
        context = multiprocessing.get_context("spawn")
        for rank in self.launch.spawned_ranks:
            reader, writer = context.Pipe(duplex=False)
            process = context.Process(target=rank_main, args=(self.config, self.launch, rank, writer,
                                                              self._log_setup),
                                      name=f"tgserve-rank-{rank}", daemon=True)
            process.start()
            writer.close()  # the rank holds the only write end: its exit closes the pipe
            self._processes[rank], self._errors[rank] = process, reader
        threading.Thread(target=self._watch, name="tgserve-rank-watch", daemon=True).start()
        tp, control_group, liveness_group = join_ranks(
            self.launch.first_rank, self.launch.world_size, self.config.master_addr, self.config.master_port,
            dist_backend, self.launch.watched_ranks)
        if self.launch.is_serving and liveness_group is not None:
            self._remote_watches = watch_ranks(liveness_group, self.launch.watched_ranks, self._is_stopping.is_set,
                                               self._lose_remote)
        return Ranks(tp, control_group, self._is_stopping.set, liveness_group)

    def stop(self) -> None:
        """Stop watching, let the ranks exit, kill those spawned here that do not, leave the groups. Safe to
        call twice.

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
        for watch in self._remote_watches:  # their goodbyes (or exits) before the group goes
            watch.join(max(0.0, deadline - time.monotonic()))
        leave_ranks()

    def report_lost(self, timeout_s: float) -> None:
        """Where a rank exited (or exits within `timeout_s`), report it through `on_lost` now: rank 0's own
        error is then only the echo of the lost rank (a collective whose peer is gone)."""
        by_sentinel = {process.sentinel: rank for rank, process in self._processes.items()}
        ready = wait(list(by_sentinel), timeout_s)
        if ready:
            self._lose(by_sentinel[ready[0]])

    def _watch(self) -> None:
        """Block until a spawned rank exits; unless stopping, kill the rest and report it."""
        by_sentinel = {process.sentinel: rank for rank, process in self._processes.items()}
        if not by_sentinel:
            return
        ready = wait(list(by_sentinel))
        if not self._is_stopping.is_set():
            self._lose(by_sentinel[ready[0]])

    def _lose_remote(self, rank: int, why: str) -> None:
        """A watched rank on another machine (or torchrun's) ended: `rank R ... is gone (...)`."""
        self._lose(rank, f"rank {rank} (started by another `tgserve serve` or torchrun) {why}")

    def _lose(self, rank: int, message: str | None = None) -> None:
        """Kill the spawned ranks and hand `on_lost` what ended `rank`, once (the watch threads and
        `report_lost` may all get here; the others wait while the first ends the process)."""
        with self._lose_lock:
            if self._is_lost:
                return
            self._is_lost = True
            self._is_stopping.set()
            message = message or self._describe(rank)
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
