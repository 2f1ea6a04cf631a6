"""`--api-key`: TGI's bearer-token check on the generation routes.

As in TGI (router/src/server.rs), only the routes that generate or tokenize are protected, and the
whole `Authorization` header is compared with `Bearer <key>` case-insensitively. A missing or
wrong header gets a bare 401 with an empty body. /info, /health, /metrics, /v1/models and
/chat_tokenize stay open, and so do CORS preflights (the CORS middleware answers them first).
"""
from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

# POST routes that need the key. GET / is the health check and stays open.
PROTECTED_PATHS = frozenset({"/", "/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions",
                             "/tokenize", "/vertex", "/invocations"})


class ApiKeyMiddleware:
    """Pure ASGI middleware: 401 for a protected POST without `Authorization: Bearer <api_key>`."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self._expected = f"Bearer {api_key}".lower().encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._is_protected(scope) and not self._is_authorized(scope):
            await send({"type": "http.response.start", "status": 401, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        await self.app(scope, receive, send)

    @staticmethod
    def _is_protected(scope: Scope) -> bool:
        return scope["method"] == "POST" and scope["path"].rstrip("/") in _PROTECTED_STRIPPED

    def _is_authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                return hmac.compare_digest(value.lower(), self._expected)
        return False


_PROTECTED_STRIPPED = frozenset(path.rstrip("/") for path in PROTECTED_PATHS)  # "/" -> ""
