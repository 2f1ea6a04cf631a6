"""Joining the ranks of a sharded server, and rank 0's view of them.

Every rank joins two process groups over the same ranks: the world group of the backend's
communicator (`tgserve_get_dist_backend`: gloo on CPU, NCCL on CUDA, ...) that the model's all-reduces
and the logits gather run on, with `COLLECTIVE_TIMEOUT_S` so a collective whose peer is gone fails
instead of hanging; and a gloo group on the host that carries the per-step header
(`step_broadcast`), whose timeout is the longest a server may sit idle, because the other ranks wait
in it between requests. A peer that dies breaks either group at once (its sockets close); the
timeouts are the bound for a peer that hangs.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from tgserve.core.config import ConfigError
from tgserve.core.distributed.tensor_parallel import TensorParallel

# The longest one collective of a step may wait for a peer (the model group): a step's ranks run in
# lockstep, so only a peer that hung, or a start-up that stalled before the first message, waits this long.
COLLECTIVE_TIMEOUT_S = 120.0
IDLE_TIMEOUT = timedelta(days=365)  # the host group: the other ranks wait there while the server is idle


@dataclass(slots=True, frozen=True)
class Ranks:
    """One process's side of a sharded server once it joined: rank 0's is handed to start-up
    (`engine_builder.build_engine`), another's to its step loop (`shard_worker`)."""

    tp: TensorParallel  # this rank among `world_size` ranks, over the model's process group
    control_group: object  # the gloo host group the step header crosses on
    on_stopping: Callable[[], None]  # tells the supervisor that the ranks now exit on purpose
    # gloo group of rank 0 and the ranks it watches over the network (`liveness`); None: it watches none
    liveness_group: object = None


def join_ranks(rank: int, world_size: int, master_addr: str, master_port: int, dist_backend: str | None,
               watched_ranks: list[int] = ()) -> tuple[TensorParallel, object, object]:
    """Join the ranks' rendezvous at master_addr:master_port (rank 0 listens there); returns this
    rank's `TensorParallel`, the host group, and the liveness group of rank 0 and `watched_ranks`
    (None where that list is empty; every rank must pass the same list). Raises ConfigError when the
    backend cannot shard or the rendezvous address cannot be used."""
    if dist_backend is None:
        raise ConfigError("this backend names no torch.distributed communicator: it cannot shard a model "
                          "(`--num-shard` must be 1)")
    address = f"{master_addr}:{master_port}"
    try:
        dist.init_process_group(dist_backend, init_method=f"tcp://{address}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    except dist.DistNetworkError as error:
        raise ConfigError(f"the ranks cannot meet at {address} (--master-addr / --master-port): {error}") from None
    control_group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    liveness_group = (dist.new_group([0, *watched_ranks], backend="gloo", timeout=IDLE_TIMEOUT)
                      if watched_ranks else None)
    return TensorParallel.from_group(), control_group, liveness_group


def leave_ranks() -> None:
    """Destroy this process's groups (after the last message), if it joined any."""
    if dist.is_initialized():
        dist.destroy_process_group()
