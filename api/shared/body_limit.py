"""`--payload-limit`: refuse request bodies over N bytes with 413, before any route parses them."""
from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tgserve.api.shared.errors import ApiError, envelope_response


def _too_large(limit_bytes: int) -> ApiError:
    return ApiError(413, "payload_limit", f"Payload too large: the request body exceeds {limit_bytes} bytes")


class BodyLimitMiddleware:
    """Pure ASGI middleware (streaming responses pass through untouched)."""

    def __init__(self, app: ASGIApp, limit_bytes: int):
        self.app = app
        self.limit_bytes = limit_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.limit_bytes:
                await envelope_response(_too_large(self.limit_bytes))(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        # No Content-Length (chunked upload): read it here, counting, then replay it.
        body, is_disconnected = await self._read_capped(receive)
        if body is None:
            await envelope_response(_too_large(self.limit_bytes))(scope, receive, send)
            return
        await self.app(scope, _replay(body, is_disconnected, receive), send)

    async def _read_capped(self, receive: Receive) -> tuple[bytes | None, bool]:
        chunks, num_bytes = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks), True
            chunk = message.get("body", b"")
            num_bytes += len(chunk)
            if num_bytes > self.limit_bytes:
                return None, False
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False


def _replay(body: bytes, is_disconnected: bool, receive: Receive) -> Receive:
    is_sent = False

    async def replayed() -> Message:
        nonlocal is_sent
        if not is_sent:
            is_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if is_disconnected:
            return {"type": "http.disconnect"}
        return await receive()  # later messages (e.g. the disconnect a stream listens for)

    return replayed
