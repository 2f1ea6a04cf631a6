"""How long this rank spends inside collectives: the communication side of a sharded step.

A sharded step is the rank's share of the compute plus its collectives (the plan broadcast, two
all-reduces per layer, one all-reduce for the embedding, the logits gather). The clock adds up the
host seconds spent inside those calls, and the engine takes the sum after every step (`StepStats`), so
`/metrics` and `tgserve benchmark shards` can split a step into compute and communication without a
profiler. Inside a call is the wait for the slowest peer as well as the transfer: a rank that
computes faster waits there for the others, which is what sharding costs it.

On a host communicator (gloo) a call returns when the collective completed, so the sum is the
communication time. On a device communicator (NCCL) a call only queues the work on the device's
stream and returns: the sum is then the host's launch time, and the device-side split needs a
profiler; timing it here would need a device sync per collective, which the hot path must not have.
"""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(slots=True)
class CollectiveClock:
    """Seconds and calls inside collectives since the last `take`; one per process, on its TensorParallel."""

    num_collectives: int = 0  # collective calls since the last take
    seconds: float = 0.0  # host seconds inside them (perf_counter)

    def add(self, started_s: float) -> None:
        """One collective that began at perf_counter() == started_s has just returned."""
        self.seconds += time.perf_counter() - started_s
        self.num_collectives += 1

    def take(self) -> tuple[int, float]:
        """(calls, seconds) since the last take; starts counting afresh."""
        taken = self.num_collectives, self.seconds
        self.num_collectives, self.seconds = 0, 0.0
        return taken
