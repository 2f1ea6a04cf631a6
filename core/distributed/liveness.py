"""Rank 0 watching ranks that are not its child processes: those on other machines, or started by torchrun.

A rank that `tgserve serve` spawned is watched through its process handle; one on another machine
cannot be. Rank 0 and the first rank of every other group of ranks (`RankLaunch.watched_ranks`) share
a gloo group on which rank 0 posts one receive per watched rank that only completes when that rank
says goodbye, after the server told it to stop. A rank that dies, or a machine whose process exits,
closes its sockets, and gloo fails the pending receive at once: rank 0 learns within a second, even
while the server is idle, rather than at the next step's collective. Each watched rank in turn
watches what it started, so a rank lost anywhere ends its group's first rank and so the server.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torch.distributed as dist


def watch_ranks(group, ranks: list[int], is_stopping: Callable[[], bool],
                on_gone: Callable[[int, str], None]) -> list[threading.Thread]:
    """On rank 0: a thread per rank of `ranks` that calls `on_gone(rank, why)` when it ends while the
    server is not stopping (its process died, or it exited without being told); returns the threads,
    which end once their rank said goodbye or is gone (join them before leaving the group)."""
    threads = [threading.Thread(target=_watch, args=(group, rank, is_stopping, on_gone),
                                name=f"tgserve-watch-rank-{rank}", daemon=True) for rank in ranks]
    for thread in threads:
        thread.start()
    return threads


def _watch(group, rank: int, is_stopping: Callable[[], bool], on_gone: Callable[[int, str], None]) -> None:
    goodbye = torch.zeros(1)
    try:
        dist.irecv(goodbye, src=rank, group=group).wait()
        why = "stopped without being told to"
    except RuntimeError as error:
        why = f"is gone ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
    if not is_stopping():
        on_gone(rank, why)


def say_goodbye(group) -> None:
    """On a watched rank, after rank 0's SHUTDOWN: complete rank 0's receive, so it knows the exit is planned."""
    dist.send(torch.ones(1), dst=0, group=group)
