"""`best_of`: run several sampled candidates of one /generate request, answer with the best.

As TGI (`infer::generate_best_of`): each candidate is its own engine request with its own random
seed, all run in parallel (they share engine steps); the winner has the highest mean token
logprob, and the others become `details.best_of_sequences`. Validation (best_of <= max_best_of,
sampling on, no seed, no streaming) happened before, in `tgserve.api.shared.validation`;
`RequestLifecycle.run` runs the candidates with these functions.

Unlike TGI, a best_of request holds one `--max-concurrent-requests` permit, not best_of, and is
counted once in the request metrics (its first candidate is the one metered).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

from tgserve.api.shared.collected import CollectedGeneration
from tgserve.api.shared.prepare import PreparedRequest
from tgserve.api.shared.validation import random_seed


def candidate_requests(prepared: PreparedRequest,
                       draw_seed: Callable[[], int] = random_seed) -> list[PreparedRequest]:
    """`prepared.best_of` copies of the request: the first keeps its seed, each other draws one."""
    candidates = [prepared]
    for _ in range(prepared.best_of - 1):
        request = prepared.request
        sampling = dataclasses.replace(request.sampling, seed=draw_seed())
        candidates.append(dataclasses.replace(prepared, request=dataclasses.replace(request, sampling=sampling)))
    return candidates


def mean_logprob(collected: CollectedGeneration) -> float:
    """Mean logprob of the generated tokens (TGI's best_of score); -inf when there is none."""
    logprobs = [event.logprob for event in collected.tokens]
    mean = sum(logprobs) / len(logprobs) if logprobs else -math.inf
    return mean if not math.isnan(mean) else -math.inf


def pick_best(candidates: list[CollectedGeneration]) -> tuple[CollectedGeneration, list[CollectedGeneration]]:
    """(the highest-scoring candidate, the others in their original order); ties go to the first."""
    best_index = max(range(len(candidates)), key=lambda i: (mean_logprob(candidates[i]), -i))
    return candidates[best_index], candidates[:best_index] + candidates[best_index + 1:]
