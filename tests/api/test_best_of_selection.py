"""`tgserve.api.best_of` without a server: candidate seeds, the winner, failures and metering."""
from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace

import pytest

from tgserve.api.best_of import candidate_requests, collect_best_of, mean_logprob, pick_best
from tgserve.api.errors import ApiError
from tgserve.api.generation import PreparedRequest
from tgserve.api.responses import CollectedGeneration
from tgserve.api.timing import RequestTimer
from tgserve.core.engine import GenerationError
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


class _Engine:
    """Yields `max_new_tokens` events per request; the request with seed `failing_seed` fails."""

    def __init__(self, failing_seed: int | None = None):
        self.failing_seed, self.closed = failing_seed, []

    async def stream(self, request):
        is_done = False
        try:
            for index in range(1, request.stopping.max_new_tokens + 1):
                await asyncio.sleep(0.01)
                if request.sampling.seed == self.failing_seed and index == 2:
                    is_done = True
                    raise GenerationError("boom")
                is_done = index == request.stopping.max_new_tokens
                finish = Finish("length", index, request.sampling.seed, "t" * index) if is_done else None
                yield TokenEvent(1, "t", -0.1 * request.sampling.seed, False, index, finish=finish)
        finally:
            if not is_done:
                self.closed.append(request.sampling.seed)


class _Metrics:
    def __init__(self):
        self.outcomes = []

    def record_success(self, split_s, generated_tokens):
        self.outcomes.append("success")

    def record_failure(self, err):
        self.outcomes.append(err)


def _run(engine, prepared):
    state = SimpleNamespace(engine=engine, metrics=_Metrics())
    return state, asyncio.run(collect_best_of(state, prepared, RequestTimer()))


def test_all_candidates_run_and_the_request_is_metered_once(monkeypatch):
    monkeypatch.setattr("tgserve.api.validation.secrets.randbits", lambda bits: 2)
    state, (best, others) = _run(_Engine(), _prepared(2))
    assert best.finish.seed == 2 and [o.finish.seed for o in others] == [11]  # -0.2 beats -1.1
    assert state.metrics.outcomes == ["success"]


def test_one_failing_candidate_fails_the_request_and_cancels_the_others(monkeypatch):
    monkeypatch.setattr("tgserve.api.validation.secrets.randbits", lambda bits: 2)
    engine = _Engine(failing_seed=2)
    with pytest.raises(ApiError) as error:
        _run(engine, _prepared(2, max_new_tokens=50))
    assert error.value.status_code == 424
    assert engine.closed == [11]  # the healthy candidate was cancelled, not left running
