"""Interleaved timing for the kernel micro-benchmarks: every candidate in each round, medians over rounds.

Candidates take turns within each round so they see the same machine weather (this VM's speed swings for
minutes at a time); the first round also warms each one up.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def interleaved_medians(calls: dict[str, Callable[[], object]], rounds: int, warmups: int,
                        runs: int) -> dict[str, float]:
    """Median microseconds per call of each candidate: `rounds` rounds, each timing `runs` calls of every
    candidate in turn (after `warmups` untimed calls in the first round, one in the others)."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for round_index in range(rounds):
            for name, call in calls.items():
                for _ in range(warmups if round_index == 0 else 1):
                    call()
                start = time.perf_counter()
                for _ in range(runs):
                    call()
                samples[name].append((time.perf_counter() - start) / runs * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}
