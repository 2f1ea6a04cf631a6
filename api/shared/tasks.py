"""Awaiting several things at once for one HTTP request: all-or-nothing, interleaved, or until hang-up.

`gather_or_cancel` runs best_of candidates and the prompts of a multi-prompt /v1/completions;
`merge_streams` interleaves those prompts' streams; `cancel_on_disconnect` drops a non-streaming
request whose client went away. Cancelling any of them closes `Engine.stream`, which cancels the
request in the engine.
"""
from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import AsyncIterator, Awaitable, TypeVar

from starlette.requests import Request

from tgserve.api.shared.errors import ApiError, ClientDisconnected

T = TypeVar("T")
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


async def gather_or_cancel(works: list[Awaitable[T]]) -> list[T]:
    """Await all `works` concurrently; on the first failure cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(work) for work in works]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()  # no-op for finished ones; closes the engine stream of the others
        await asyncio.gather(*tasks, return_exceptions=True)


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


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client hangs up first (TGI drops such requests too).

    Raises `ClientDisconnected` in that case; nobody is left to read the answer.
    """
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
