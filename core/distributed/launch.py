"""Which ranks of a sharded server this process runs, and which it starts: one machine, several
machines (`--nnodes` / `--node-rank`), or torchrun.

`--num-shard N` alone: this process is rank 0 and starts ranks 1..N-1 on this machine. With
`--nnodes M --node-rank R` (`--num-shard` the total, as torchrun's world size) every machine runs
`tgserve serve` itself, and each starts its own N / M ranks, R * N / M onwards; node 0's first rank
serves HTTP, the other nodes' first ranks run the other ranks' step loop. Under torchrun (its
`RANK`, `WORLD_SIZE`, `LOCAL_RANK` in the environment) torchrun started every rank, so each process
is exactly one rank and starts none. The rendezvous is torch.distributed's at `--master-addr` /
`--master-port` (torchrun's `MASTER_ADDR` / `MASTER_PORT`) either way.

A rank's process that a `tgserve serve` process started is watched through its process handle
(`rank_processes`); ranks on other machines, or started by torchrun, cannot be, so rank 0 watches
each such group of ranks through its first rank (`RankLaunch.watched_ranks`, `liveness`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tgserve.core.config import ConfigError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(slots=True, frozen=True)
class TorchrunRank:
    """The rank torchrun (or any launcher with its conventions) started this process as."""

    rank: int  # RANK: global rank, 0 .. world_size - 1
    world_size: int  # WORLD_SIZE: ranks over every machine
    local_rank: int  # LOCAL_RANK: index of this rank among its machine's ranks (its device)


@dataclass(slots=True, frozen=True)
class RankLaunch:
    """This process's share of the server's ranks."""

    world_size: int  # every rank of the server: --num-shard
    first_rank: int  # the rank this process runs; it starts first_rank + 1 .. first_rank + num_local_ranks - 1
    num_local_ranks: int  # ranks this process runs and starts (1 under torchrun)
    ranks_per_group: int  # ranks started together by one process (a machine's, or 1 under torchrun)
    first_local_rank: int = 0  # the device index of first_rank on its machine (torchrun's LOCAL_RANK)

    @property
    def is_serving(self) -> bool:
        """Whether this process is rank 0, which serves HTTP and runs the scheduler."""
        return self.first_rank == 0

    @property
    def spawned_ranks(self) -> range:
        """The ranks this process starts itself, as child processes."""
        return range(self.first_rank + 1, self.first_rank + self.num_local_ranks)

    @property
    def watched_ranks(self) -> list[int]:
        """The first rank of every other group: the processes rank 0 watches over the network."""
        return list(range(self.ranks_per_group, self.world_size, self.ranks_per_group))

    def local_rank(self, rank: int) -> int:
        """The device index on this machine of `rank`, one of this process's ranks."""
        return self.first_local_rank + rank - self.first_rank


def read_torchrun(environ: Mapping[str, str]) -> TorchrunRank | None:
    """torchrun's variables from `environ`, or None where they are not all set. Raises ConfigError for
    values that are not a rank in a world."""
    if not any(name in environ for name in TORCHRUN_VARIABLES):
        return None
    missing = [name for name in TORCHRUN_VARIABLES if name not in environ]
    if missing:
        raise ConfigError(f"the environment sets some of torchrun's {', '.join(TORCHRUN_VARIABLES)} but not "
                          f"{', '.join(missing)}: start tgserve with torchrun, or unset them")
    try:
        found = TorchrunRank(*(int(environ[name]) for name in TORCHRUN_VARIABLES))
    except ValueError:
        raise ConfigError(f"torchrun's {', '.join(f'{n}={environ[n]!r}' for n in TORCHRUN_VARIABLES)} "
                          "are not integers") from None
    if not 0 <= found.rank < found.world_size or found.local_rank < 0:
        raise ConfigError(f"torchrun's RANK={found.rank} is not a rank of WORLD_SIZE={found.world_size}")
    return found


def plan_launch(num_shard: int | None, nnodes: int, node_rank: int, torchrun: TorchrunRank | None) -> RankLaunch:
    """This process's ranks. num_shard: --num-shard as given (None: unset); nnodes, node_rank: the flags.

    Raises ConfigError where torchrun's world and --num-shard disagree, or --nnodes with torchrun."""
    if torchrun is not None:
        if nnodes != 1 or node_rank != 0:
            raise ConfigError("torchrun started this process as one rank: `--nnodes` / `--node-rank` are "
                              "torchrun's flags there, not tgserve's; drop them")
        if num_shard is not None and num_shard != torchrun.world_size:
            raise ConfigError(f"`--num-shard {num_shard}` but torchrun started WORLD_SIZE={torchrun.world_size} "
                              f"ranks: they must agree (or leave `--num-shard` out)")
        return RankLaunch(torchrun.world_size, torchrun.rank, 1, 1, torchrun.local_rank)
    world_size = num_shard or 1
    if world_size % nnodes:
        raise ConfigError(f"`--num-shard {world_size}` (every machine's ranks together) does not divide over "
                          f"`--nnodes {nnodes}` machines")
    per_node = world_size // nnodes
    return RankLaunch(world_size, node_rank * per_node, per_node, per_node)
