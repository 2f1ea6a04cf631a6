"""EngineInvariantError: a tgserve bug, so the HTTP layer must not mistake it for a bad request."""
from __future__ import annotations

from tgserve.api.shared.errors import api_error
from tgserve.core.invariants import EngineInvariantError


def test_invariant_error_is_not_mapped_to_a_client_status():
    # `api_error` is where every exception during a request gets its status: a broken invariant is a
    # tgserve bug (500), never the user's validation error (422) nor a typed engine failure.
    assert api_error(EngineInvariantError("broken")).status_code == 500
    assert not issubclass(EngineInvariantError, AssertionError)  # `python -O` must not be able to strip it
