"""`tgserve.api.shared.best_of`'s pure functions without a server: the candidates' seeds and the winner.

These take plain values (requests, collected token events) and fake no engine behaviour; the
winner's logprobs are hand-made so ties and NaN can be set exactly. What needs an engine is tested
on the real one: a failing candidate and metering in `test_engine_faults.py` and `test_best_of.py`,
a client hanging up on best_of in `test_disconnect.py`.
"""
from __future__ import annotations

import math

from tgserve.api.shared.best_of import candidate_requests, mean_logprob, pick_best
from tgserve.api.shared.collected import CollectedGeneration
from tgserve.api.shared.prepare import PreparedRequest
from tgserve.core.request import Finish, GenerationRequest, SamplingParams, StoppingParams, TokenEvent


def _collected(*logprobs: float) -> CollectedGeneration:
    collected = CollectedGeneration()
    for index, logprob in enumerate(logprobs, start=1):
        finish = Finish("length", index, 1, "x" * index) if index == len(logprobs) else None
        collected.add(TokenEvent(1, "x", logprob, False, index, finish=finish))
    return collected


def _prepared(best_of: int, max_new_tokens: int = 3) -> PreparedRequest:
    request = GenerationRequest([5, 6], SamplingParams(do_sample=True, seed=11, watermark=True),
                                StoppingParams(max_new_tokens=max_new_tokens))
    return PreparedRequest(request, input_length=2, prompt_prefix="", top_n_tokens=0, best_of=best_of)


def test_candidates_differ_only_by_seed():
    seeds = iter([21, 31])
    prepared = _prepared(3)
    candidates = candidate_requests(prepared, draw_seed=lambda: next(seeds))
    assert [c.request.sampling.seed for c in candidates] == [11, 21, 31]
    assert all(c.request.sampling.watermark and c.request.input_ids == [5, 6] for c in candidates)
    assert len({id(c.request) for c in candidates}) == 3  # the engine sets request_id on each


def test_winner_has_the_highest_mean_logprob():
    a, b, c = _collected(-1.0, -1.0), _collected(-0.1, -2.0, -0.1), _collected(-0.5)
    assert math.isclose(mean_logprob(b), -2.2 / 3)
    assert pick_best([a, b, c]) == (c, [a, b])
    tie = _collected(-0.5)
    assert pick_best([c, tie]) == (c, [tie])  # ties go to the first, as TGI's strict `>`
    nan = _collected(float("nan"))
    assert pick_best([nan, a]) == (a, [nan])
