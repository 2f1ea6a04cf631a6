"""The error an engine invariant raises when it breaks: a bug inside tgserve, never the user's input."""
from __future__ import annotations


class EngineInvariantError(RuntimeError):
    """An internal consistency check failed (a double free, allocating past the free list, a request
    admitted that can never fit). The caller broke a contract, so this is a tgserve bug, never a
    problem with the request: nothing maps it to a 4xx status. It is raised explicitly rather than
    with `assert`, so `python -O` keeps the check; it is deliberately not a `ValueError`, which the
    HTTP layer reports as a 422 validation error."""
