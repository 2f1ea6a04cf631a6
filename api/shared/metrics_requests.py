"""Request-level metrics around the engine's event stream: success, failure by kind, and timings.

Every request's lifecycle (`tgserve.api.shared.lifecycle`) consumes `Engine.stream` through `metered_stream`, which records how the
request ended exactly once:

- every engine step that gave it tokens: `tgi_request_skipped_tokens` (the step's tokens less one);
- finished: `tgi_request_success` and the duration / token histograms (timings from `RequestTimer`);
- the engine failed it: `tgi_request_failure{err="generation"}` (or "validation" when it could
  never fit the KV cache);
- the stream ended without a finished token: `err="incomplete"`;
- the consumer stopped early, i.e. the client went away: `err="dropped"`. Closing the stream
  cancels the request in the engine, which frees its KV blocks before the next step. A request
  left before this stream started (in its prepare step) is counted `dropped` by the lifecycle's permit.

The permit records arrival (`record_request`) and overload; the prepare step, validation failures.
"""
from __future__ import annotations

from contextlib import aclosing
from typing import AsyncIterator

from tgserve.api.shared.metrics import ServerMetrics
from tgserve.api.shared.timing import RequestTimer
from tgserve.core.errors import EngineStopped, GenerationError, RequestRejected
from tgserve.core.request import TokenEvent

# What `Engine.stream` may raise, and the failure it counts as (None: not a request failure).
_ENGINE_FAILURES: tuple[tuple[type[Exception], str | None], ...] = (
    (GenerationError, "generation"), (EngineStopped, None), (RequestRejected, "validation"))


async def metered_stream(metrics: ServerMetrics, events: AsyncIterator[TokenEvent],
                         timer: RequestTimer) -> AsyncIterator[TokenEvent]:
    """Yield `events` unchanged while recording the request's outcome in `metrics`.

    Closing this iterator closes `events` (cancelling the request in the engine). Engine errors
    are re-raised after they are counted.
    """
    is_recorded = False
    try:
        async with aclosing(events):
            async for event in events:
                if event.num_step_tokens:
                    metrics.record_step_tokens(event.num_step_tokens)
                if event.finish is not None and not is_recorded:
                    is_recorded = True
                    timer.mark_end()
                    metrics.record_success(timer.split_s(event.finish), event.finish.generated_tokens,
                                           event.finish.cached_tokens)
                yield event
        if not is_recorded:
            is_recorded = True
            metrics.record_failure("incomplete")
    except Exception as error:
        if not is_recorded:
            is_recorded = True
            err = next((label for kind, label in _ENGINE_FAILURES if isinstance(error, kind)), "generation")
            if err is not None:
                metrics.record_failure(err)
        raise
    finally:
        if not is_recorded:  # closed or cancelled before the last token: the client went away
            metrics.record_failure("dropped")
