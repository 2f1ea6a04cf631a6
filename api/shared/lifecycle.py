"""One generation request's lifecycle, the same for every route: permit, prepare, engine, log, errors.

    lifecycle = RequestLifecycle(state, preparer(state, body))
    generated = await lifecycle.run()        # a whole answer (best_of candidates included), or ApiError
    async for item in lifecycle.stream():    # the PreparedRequest, then TokenEvents, or one ApiError last
        ...

Both take one `--max-concurrent-requests` permit (429 when none is free) for the whole request,
run its prepare step (validate, tokenize), consume `Engine.stream` through `metered_stream` (the
request metrics and timings), log TGI's "Success" line with the timings, and answer any failure
through `errors.api_error`, the one place an exception gets a status. The routes differ only in
how they render a `Generated` or the stream's items; a /v1/completions request with several
prompts is one lifecycle per prompt (`tasks.gather_or_cancel`, `tasks.merge_streams`).
"""
from __future__ import annotations

import logging
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

from tgserve.api.shared.best_of import candidate_requests, pick_best
from tgserve.api.shared.collected import CollectedGeneration
from tgserve.api.shared.errors import ApiError, api_error, incomplete_generation_error, overloaded_error
from tgserve.api.shared.metrics_requests import metered_stream
from tgserve.api.shared.prepare import Prepare, PreparedRequest
from tgserve.api.shared.state import ServerState
from tgserve.api.shared.tasks import gather_or_cancel
from tgserve.api.shared.timing import RequestTimer
from tgserve.core.request import Finish, GenerationRequest, TokenEvent

logger = logging.getLogger(__name__)
StreamItem = PreparedRequest | TokenEvent | ApiError  # what `RequestLifecycle.stream` yields


@dataclass(slots=True)
class Generated:
    """A finished non-streaming request."""

    prepared: PreparedRequest
    best: CollectedGeneration  # the answer (the best_of winner when there were candidates)
    others: list[CollectedGeneration] = field(default_factory=list)  # the losing best_of candidates

    @property
    def finish(self) -> Finish:
        finish = self.best.finish
        assert finish is not None, "only finished generations are answered"
        return finish


class RequestLifecycle:
    """One request from permit to answer; `run` or `stream` it once."""

    def __init__(self, state: ServerState, prepare: Prepare):
        self.state = state
        self.prepare = prepare
        self.timer = RequestTimer()  # started now: the validation time counts from the handler
        self.is_metered = False  # set when `metered_stream` owns the request's outcome in the metrics

    async def run(self) -> Generated:
        """Run the request to its end (every best_of candidate); raise `ApiError` on any failure."""
        async with self._permit():
            try:
                prepared = await self.prepare(self.timer)
                best, others = await self._collect_candidates(prepared)
            except Exception as error:
                raise api_error(error) from None
        generated = Generated(prepared, best, others)
        self._log_success(generated.finish)
        return generated

    async def stream(self) -> AsyncIterator[StreamItem]:
        """Yield the `PreparedRequest`, then one `TokenEvent` per token; a failure is yielded as
        one `ApiError` and ends the stream. Closing the iterator cancels the request in the engine."""
        try:
            async with self._permit():
                prepared = await self.prepare(self.timer)
                yield prepared
                async with aclosing(self._engine_events(prepared.request)) as events:
                    async for event in events:
                        yield event
                        if event.finish is not None:
                            self._log_success(event.finish)
                            return
                raise incomplete_generation_error(is_stream=True)
        except Exception as error:
            yield api_error(error)

    @asynccontextmanager
    async def _permit(self) -> AsyncIterator[None]:
        """Hold one permit for the request. A request cancelled or closed before its engine stream
        started (in the prepare step, or a stream closed after its PreparedRequest) is counted
        `dropped` here: `metered_stream` counts only the requests it saw start."""
        if not self.state.limiter.try_acquire():
            raise overloaded_error()
        try:
            yield
        except BaseException as error:
            if not self.is_metered and not isinstance(error, Exception):  # CancelledError, GeneratorExit
                self.state.metrics.record_failure("dropped")
            raise
        finally:
            self.state.limiter.release()

    async def _engine_events(self, request: GenerationRequest, is_metered: bool = True) -> AsyncIterator[TokenEvent]:
        """`Engine.stream(request)`, metered unless `is_metered` is False (extra best_of candidates)."""
        events = self.state.engine.stream(request)
        if is_metered:
            self.is_metered = True  # nothing awaits from here until metered_stream's body has started
            events = metered_stream(self.state.metrics, events, self.timer)
        async with aclosing(events):
            async for event in events:
                if event.finish is not None:
                    self.timer.mark_end()
                yield event

    async def _collect(self, request: GenerationRequest, is_metered: bool = True) -> CollectedGeneration:
        """Every event of `request`; raise 500 "incomplete_generation" if the stream ends unfinished."""
        collected = CollectedGeneration()
        async with aclosing(self._engine_events(request, is_metered)) as events:
            async for event in events:
                collected.add(event)
                if event.finish is not None:
                    return collected
        raise incomplete_generation_error(is_stream=False)

    async def _collect_candidates(self, prepared: PreparedRequest) -> tuple[CollectedGeneration,
                                                                             list[CollectedGeneration]]:
        """(the answer, the losing best_of candidates); one failing candidate cancels the others."""
        if prepared.best_of <= 1:
            return await self._collect(prepared.request), []
        candidates = candidate_requests(prepared)
        results = await gather_or_cancel([self._collect(candidate.request, is_metered=i == 0)
                                          for i, candidate in enumerate(candidates)])
        return pick_best(results)

    def _log_success(self, finish: Finish) -> None:
        logger.info("Success %s", self.timer.log_fields(finish))
