"""`RequestLifecycle` on the real engine (cpu backend, demo model), without HTTP: how a request's
failures are answered, and that its permit is always given back.

The engine's rejection is real (a request that can never fit the KV cache, refused by
`Engine.submit`). The one injection is a `ValueError` from `submit` on the engine instance, the
shape of an engine bug that reaches the API synchronously (a failing step reaches it as
`GenerationError`, tested over HTTP in test_engine_faults.py). Expected statuses are TGI's
(TGI-CONTRACT section 2.3): 422 "validation" for the client's fault, 429 "overloaded".
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from contextlib import aclosing

import pytest

from tests.core.engine_harness import running_engine
from tgserve.api.shared.concurrency import ConcurrencyLimiter
from tgserve.api.shared.errors import ApiError
from tgserve.api.shared.lifecycle import RequestLifecycle
from tgserve.api.shared.prepare import PreparedRequest
from tgserve.api.shared.state import ServerState
from tgserve.api.shared.tasks import gather_or_cancel
from tgserve.core.request import GenerationRequest, SamplingParams, StoppingParams, TokenEvent

LIMITS = {"max_batch_prefill_tokens": 64, "max_batch_total_tokens": 4096, "max_total_tokens": 512,
          "max_concurrent_requests": 1}


@pytest.fixture(scope="module")
def state(demo_model_dir):
    with running_engine(demo_model_dir, **LIMITS) as engine:
        yield ServerState.from_engine(engine)


def prepare_ids(input_ids: list[int], max_new_tokens: int):
    """A prepare step that skips validation: what reaches the engine is exactly this request."""
    async def prepare(timer) -> PreparedRequest:
        timer.mark_queued()
        request = GenerationRequest(input_ids, SamplingParams(), StoppingParams(max_new_tokens=max_new_tokens))
        return PreparedRequest(request, input_length=len(input_ids), prompt_prefix="", top_n_tokens=0)
    return prepare


async def stream_items(lifecycle: RequestLifecycle) -> list:
    async with aclosing(lifecycle.stream()) as items:
        return [item async for item in items]


def run_error(state: ServerState, prepare) -> ApiError:
    with pytest.raises(ApiError) as raised:
        asyncio.run(RequestLifecycle(state, prepare).run())
    return raised.value


def test_a_finished_request_and_its_stream(state):
    generated = asyncio.run(RequestLifecycle(state, prepare_ids([1, 2, 3], 3)).run())
    assert generated.finish.generated_tokens == 3 and len(generated.best.tokens) == 3
    items = asyncio.run(stream_items(RequestLifecycle(state, prepare_ids([1, 2, 3], 3))))
    assert isinstance(items[0], PreparedRequest) and all(isinstance(i, TokenEvent) for i in items[1:])
    assert [i.finish is not None for i in items[1:]] == [False, False, True]
    assert state.limiter.num_in_flight == 0


def test_the_engine_rejection_is_the_only_engine_error_answered_422(state):
    never_fits = prepare_ids([1, 2, 3], 10**6)
    error = run_error(state, never_fits)
    assert (error.status_code, error.error_type) == (422, "validation")
    assert error.message.startswith("Input validation error: request needs")
    items = asyncio.run(stream_items(RequestLifecycle(state, never_fits)))
    assert isinstance(items[0], PreparedRequest) and [type(i) for i in items[1:]] == [ApiError]
    assert (items[1].status_code, items[1].error_type) == (422, "validation")
    assert state.limiter.num_in_flight == 0


def test_a_value_error_from_the_engine_is_a_logged_500(state, monkeypatch, caplog):
    def broken_submit(request, sink):
        raise ValueError("engine bug")

    monkeypatch.setattr(state.engine, "submit", broken_submit)
    with caplog.at_level(logging.ERROR, logger="tgserve.api.shared.errors"):
        error = run_error(state, prepare_ids([1, 2, 3], 3))
        items = asyncio.run(stream_items(RequestLifecycle(state, prepare_ids([1, 2, 3], 3))))
    assert (error.status_code, error.error_type) == (500, "internal") and "engine bug" in error.message
    assert (items[-1].status_code, items[-1].error_type) == (500, "internal")
    tracebacks = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], ValueError)]
    assert len(tracebacks) == 2  # each request logged once, with its traceback
    assert state.limiter.num_in_flight == 0


def test_a_second_request_is_overloaded_while_the_permit_is_held(state):
    """`--max-concurrent-requests 1`: while one stream holds the permit, run() and stream() get 429."""
    async def main() -> tuple[ApiError, list]:
        async with aclosing(RequestLifecycle(state, prepare_ids([1, 2, 3], 50)).stream()) as first:
            assert isinstance(await anext(first), PreparedRequest)  # permit taken, engine not yet asked
            with pytest.raises(ApiError) as raised:
                await RequestLifecycle(state, prepare_ids([1, 2, 3], 3)).run()
            return raised.value, await stream_items(RequestLifecycle(state, prepare_ids([1, 2, 3], 3)))

    error, items = asyncio.run(main())
    assert (error.status_code, error.error_type) == (429, "overloaded")
    assert [(i.status_code, i.error_type) for i in items] == [(429, "overloaded")]
    assert state.limiter.num_in_flight == 0  # the closed stream gave its permit back


def num_dropped(state: ServerState) -> float:
    return state.metrics.registry.get_sample_value("tgi_request_failure_total", {"err": "dropped"}) or 0.0


def test_a_request_the_client_leaves_is_dropped_once_wherever_it_was(state):
    """Cancelled in its prepare step, closed right after its PreparedRequest, or closed after a
    token: each counts `dropped` exactly once (the first two never reach `metered_stream`)."""
    async def cancelled_in_prepare() -> None:
        started = asyncio.Event()

        async def prepare(timer) -> PreparedRequest:
            started.set()
            await asyncio.Event().wait()  # tokenizing forever: the client leaves first

        task = asyncio.create_task(RequestLifecycle(state, prepare).run())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    async def closed_after(num_items: int) -> None:
        async with aclosing(RequestLifecycle(state, prepare_ids([1, 2, 3], 50)).stream()) as items:
            for _ in range(num_items):
                await anext(items)

    for leave in (cancelled_in_prepare, lambda: closed_after(1), lambda: closed_after(2)):
        before = num_dropped(state)
        asyncio.run(leave())
        assert num_dropped(state) - before == 1
        assert state.limiter.num_in_flight == 0


class StepCounter:
    """A `StepObserver` that counts the engine's steps: running a request to its end takes one per token."""

    def __init__(self):
        self.num_steps = 0

    def on_step(self, stats) -> None:
        self.num_steps += 1

    def on_idle(self) -> None:
        pass


def wait_until_engine_empty(state: ServerState, timeout_s: float = 120.0) -> None:
    """Block until no request is queued or running in the engine (cancels are applied between steps)."""
    deadline = time.monotonic() + timeout_s
    while state.engine.num_in_flight or state.engine.num_running or state.engine.num_waiting:
        assert time.monotonic() < deadline, "the engine never emptied"
        time.sleep(0.01)


def test_the_prompts_of_a_request_the_client_leaves_are_dropped_wherever_each_was(state):
    """A multi-prompt /v1/completions runs one lifecycle per prompt under `gather_or_cancel`; a
    hang-up cancels the gather while its prompts are at different stages. Here one generates in
    the engine and the other is still in its prepare step, then the same with the first one already
    finished: every prompt that had not ended counts `dropped` once and leaves the engine long
    before its last token, the finished one counts a success, both permits come back and the
    engine frees every KV block."""
    two_permits = dataclasses.replace(state, limiter=ConcurrencyLimiter(2, state.metrics))
    metrics = state.metrics.registry
    max_new_tokens = 400  # the prompt that is still generating: ~400 steps if it were not cancelled

    def num_succeeded() -> float:
        return metrics.get_sample_value("tgi_request_success_total") or 0.0

    async def leave(num_tokens: int, is_first_finished: bool) -> None:
        in_prepare = asyncio.Event()

        async def prepare_forever(timer) -> PreparedRequest:
            in_prepare.set()
            await asyncio.Event().wait()  # tokenizing forever: the client leaves first

        first = asyncio.ensure_future(RequestLifecycle(two_permits, prepare_ids([1, 2, 3], num_tokens)).run())
        work = asyncio.ensure_future(gather_or_cancel([first, RequestLifecycle(two_permits, prepare_forever).run()]))
        await in_prepare.wait()
        while not (first.done() if is_first_finished else state.engine.num_running):
            await asyncio.sleep(0.01)
        assert two_permits.limiter.num_in_flight == 2 - is_first_finished
        work.cancel()
        with pytest.raises(asyncio.CancelledError):
            await work

    for num_tokens, is_first_finished in ((max_new_tokens, False), (3, True)):
        dropped_before, succeeded_before = num_dropped(state), num_succeeded()
        steps = StepCounter()
        state.engine.set_observer(steps)
        try:
            asyncio.run(leave(num_tokens, is_first_finished))
            wait_until_engine_empty(state)
        finally:
            state.engine.set_observer(None)
        assert (num_dropped(state) - dropped_before, num_succeeded() - succeeded_before) == \
            ((1, 1) if is_first_finished else (2, 0))
        assert steps.num_steps < max_new_tokens // 2  # cut short by the cancel, not run to its end
        assert two_permits.limiter.num_in_flight == 0
        assert state.engine.num_used_kv_blocks == 0
