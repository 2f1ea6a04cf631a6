"""What the engine tells an observer after each step: the seam the API's Prometheus metrics hang on.

The engine calls an optional `StepObserver` from its own thread: `on_step` once per step and
`on_idle` when it runs out of work. Nothing here knows about Prometheus or HTTP. An observer runs
between steps, so it must be cheap (no per-token work); if it raises, the engine logs and goes on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(slots=True, frozen=True)
class StepStats:
    """One engine step, counted and timed by the engine thread (`Engine._step`)."""

    num_seqs: int  # sequences computed in this step
    num_new_seqs: int  # of those, sequences computed for the first time: they joined the batch now
    num_tokens: int  # tokens computed in this step: prompt chunks plus 1 + k per decoding sequence verifying k guesses
    num_prefill_tokens: int  # of those, prompt tokens; > 0 makes this a "prefill" step
    num_running: int  # sequences holding KV blocks after the step: the batch size
    num_waiting: int  # sequences queued for admission after the step
    max_batch_tokens: int  # KV slots the running sequences reserved (prompt + max_new_tokens each)
    schedule_s: float  # planning the step, admission of waiting sequences included
    forward_s: float  # the model runner: forward pass and sampling, up to the host copy of the ids
    update_s: float  # turning sampled ids into token events: detokenize, stop checks, send to callers
    filter_s: float  # taking finished and cancelled sequences out of the batch and freeing their blocks
    #                  (mostly inside update_s; cancels drained before the step count here too)
    duration_s: float  # the whole step, planning to the last event sent
    is_ok: bool  # False when the runner raised and the step's requests failed
    # sharded server: rank 0's collectives in the step (plan broadcast, all-reduces, logits gather) and the
    # seconds inside them, part of forward_s (`core/distributed/collective_clock`); 0 on one rank
    num_collectives: int = 0
    collective_s: float = 0.0

    @property
    def is_prefill(self) -> bool:
        """True when the step computed prompt tokens (TGI's "prefill"); False for a pure decode step."""
        return self.num_prefill_tokens > 0


class StepObserver(Protocol):
    """Receives the engine's step reports, on the engine thread."""

    def on_step(self, stats: StepStats) -> None:
        """Called once per step, after its token events were sent (or its requests failed)."""

    def on_idle(self) -> None:
        """Called when a loop iteration finds nothing to compute: the batch and the queue are empty."""
