"""One id per HTTP request, carried in a context variable so every log line about it can name it.

`RequestIdMiddleware` sets a fresh id when a request arrives; code running for that request
(the route, its streaming body, the worker threads `asyncio.to_thread` starts) sees it through
`current_request_id`, and `--json-output` writes it as `request_id`. The engine thread serves
many requests at once and logs without one.
"""
from __future__ import annotations

import contextvars
import uuid

from starlette.types import ASGIApp, Receive, Scope, Send

_REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("tgserve_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the HTTP request being served in this context, None outside one."""
    return _REQUEST_ID.get()


class RequestIdMiddleware:
    """Pure ASGI middleware giving each HTTP request a new random id (32 hex digits)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = _REQUEST_ID.set(uuid.uuid4().hex)
        try:
            await self.app(scope, receive, send)
        finally:
            _REQUEST_ID.reset(token)
