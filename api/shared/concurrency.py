"""TGI's `--max-concurrent-requests` semaphore: a request that finds it full gets 429 at once.

Every generation route asks for a permit exactly once per request, so this is also where requests
are counted for `tgi_request_count` and refusals for `tgi_request_failure{err="overloaded"}`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tgserve.api.shared.metrics import ServerMetrics


class ConcurrencyLimiter:
    """Counts generation requests in flight; used from the event loop thread only (no lock)."""

    def __init__(self, max_concurrent_requests: int, metrics: "ServerMetrics | None" = None):
        self.max_concurrent_requests = max_concurrent_requests
        self.num_in_flight = 0
        self.metrics = metrics  # where arrivals and refusals are counted

    def try_acquire(self) -> bool:
        """Take a permit if one is free; False means the caller must answer "Model is overloaded"."""
        if self.metrics is not None:
            self.metrics.record_request()
        if self.num_in_flight >= self.max_concurrent_requests:
            if self.metrics is not None:
                self.metrics.record_failure("overloaded")
            return False
        self.num_in_flight += 1
        return True

    def release(self) -> None:
        """Give back a permit taken with `try_acquire`."""
        assert self.num_in_flight > 0, "release() without a matching try_acquire()"
        self.num_in_flight -= 1
