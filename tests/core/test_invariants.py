"""EngineInvariantError: a tgserve bug, so the HTTP layer must not mistake it for a bad request."""
from __future__ import annotations

from tgserve.api.generation import ENGINE_ERRORS
from tgserve.core.invariants import EngineInvariantError


def test_invariant_error_is_not_mapped_to_a_client_status():
    # ENGINE_ERRORS are the exceptions the routes turn into 422/424/503; a ValueError subclass would be
    # reported as the user's validation error.
    assert not issubclass(EngineInvariantError, ENGINE_ERRORS)
    assert not issubclass(EngineInvariantError, AssertionError)  # `python -O` must not be able to strip it
