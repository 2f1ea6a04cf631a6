"""Running OpenAI-route requests through the /generate machinery: limiter, validation, engine.

Each prompt is one `GenerateRequest` that goes through `check_parameters`, `fit_input_ids`,
`collect_generation` / `Engine.stream` and the `--max-concurrent-requests` limiter, exactly as
on /generate. Streaming routes report failures inside the stream, as TGI does; several streams
(one per /v1/completions prompt) are merged as their tokens arrive.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from typing import AsyncIterator, Awaitable, Callable, TypeVar

from tgserve.api.errors import ApiError, incomplete_generation_error, overloaded_error
from tgserve.api.generation import (ENGINE_ERRORS, PreparedRequest, collect_generation, engine_error,
                                    prepare_request)
from tgserve.api.metrics_requests import metered_stream
from tgserve.api.responses import CollectedGeneration
from tgserve.api.schemas import GenerateRequest
from tgserve.api.state import ServerState
from tgserve.api.timing import RequestTimer
from tgserve.core.request import TokenEvent

logger = logging.getLogger(__name__)
T = TypeVar("T")
Prepare = Callable[[RequestTimer], Awaitable[PreparedRequest]]
StreamItem = PreparedRequest | TokenEvent | ApiError  # what `stream_generation` yields


def preparer(state: ServerState, body: GenerateRequest, *, is_templated: bool) -> Prepare:
    """The preparation step of one prompt: templated chat text or a raw completions prompt."""
    return lambda timer: prepare_request(state, body, timer, add_special_tokens=not is_templated)


async def generate_to_end(state: ServerState, prepare: Prepare,
                          timer: RequestTimer) -> tuple[PreparedRequest, CollectedGeneration]:
    """Run one request to its end under a concurrency permit; raise `ApiError` on any failure."""
    if not state.limiter.try_acquire():
        raise overloaded_error()
    try:
        prepared = await prepare(timer)
        collected = await collect_generation(state, prepared, timer)
    finally:
        state.limiter.release()
    assert collected.finish is not None
    logger.info("Success %s", timer.log_fields(collected.finish))
    return prepared, collected


async def gather_or_cancel(works: list[Awaitable[T]]) -> list[T]:
    """Await all `works` concurrently; on the first failure cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(work) for work in works]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def stream_generation(state: ServerState, prepare: Prepare, timer: RequestTimer) -> AsyncIterator[StreamItem]:
    """Yield the `PreparedRequest`, then one `TokenEvent` per token; a failure is yielded as an
    `ApiError` and ends the stream. Closing the iterator cancels the request in the engine."""
    if not state.limiter.try_acquire():
        yield overloaded_error()
        return
    try:
        try:
            prepared = await prepare(timer)
        except ApiError as error:
            yield error
            return
        yield prepared
        async for item in _engine_events(state, prepared, timer):
            yield item
    finally:
        state.limiter.release()


async def _engine_events(state: ServerState, prepared: PreparedRequest,
                         timer: RequestTimer) -> AsyncIterator[TokenEvent | ApiError]:
    try:
        async with aclosing(metered_stream(state.metrics, state.engine.stream(prepared.request), timer)) as events:
            async for event in events:
                yield event
                if event.finish is not None:
                    timer.mark_end()
                    logger.info("Success %s", timer.log_fields(event.finish))
                    return
    except ENGINE_ERRORS as error:
        yield engine_error(error)
        return
    yield incomplete_generation_error(is_stream=True)


async def merge_streams(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave `streams` as their items arrive, tagged with the stream's index.

    Closing the merged iterator closes every stream (so their requests are cancelled).
    """
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async with aclosing(stream) as items:  # type: ignore[type-var]
                async for item in items:
                    queue.put_nowait((index, item))
        except Exception as error:  # a bug: hand it to the consumer instead of losing it in a task
            queue.put_nowait((index, error))
        finally:
            queue.put_nowait((index, done))

    tasks = [asyncio.ensure_future(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        num_open = len(tasks)
        while num_open:
            index, item = await queue.get()
            if item is done:
                num_open -= 1
            elif isinstance(item, Exception) and not isinstance(item, ApiError):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
