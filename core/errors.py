"""What the engine raises to its callers, by kind, so the HTTP layer maps each to one status.

`RequestRejected` is the only one a client caused (TGI's 422 "validation"); `GenerationError` is
a failure while computing the request (TGI's 424 "generation"); `EngineStopped` means the server
is draining (503). Anything else out of the engine is a bug, and the API answers it as one
(logged, 500), never as the client's mistake. None of them subclasses `ValueError`, so a stray
`ValueError` can never be mistaken for a rejection.
"""
from __future__ import annotations


class RequestRejected(Exception):
    """`Engine.submit` refuses a request it can never serve (e.g. it can never fit the KV cache)."""


class GenerationError(RuntimeError):
    """The engine failed while computing a request (TGI's 424 `generation` error)."""


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no new requests."""
