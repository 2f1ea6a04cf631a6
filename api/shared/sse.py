"""Server-sent events as TGI frames them, and the response that carries them.

A client that disconnects cancels its request in the engine: Starlette cancels the response task
on `http.disconnect`, and `SSEResponse` always closes the body generator, which closes the
request's `RequestLifecycle.stream`, which closes `Engine.stream`, which cancels the request.
"""
from __future__ import annotations

import json

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


def sse_data(body: dict) -> bytes:
    """One SSE event, framed as TGI/axum frame it: `data:` without a space, then a blank line."""
    return b"data:" + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def stream_headers(compute_type: str, num_characters: int) -> dict[str, str]:
    """The headers TGI sends on streaming routes."""
    return {"x-compute-type": compute_type, "x-compute-characters": str(num_characters),
            "X-Accel-Buffering": "no", "Cache-Control": "no-cache"}


class SSEResponse(StreamingResponse):
    """A `text/event-stream` response that closes its generator however the response ends."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[union-attr]
