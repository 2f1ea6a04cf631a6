"""TGI's `--max-concurrent-requests` semaphore: a request that finds it full gets 429 at once."""
from __future__ import annotations


class ConcurrencyLimiter:
    """Counts generation requests in flight; used from the event loop thread only (no lock)."""

    def __init__(self, max_concurrent_requests: int):
        self.max_concurrent_requests = max_concurrent_requests
        self.num_in_flight = 0

    def try_acquire(self) -> bool:
        """Take a permit if one is free; False means the caller must answer "Model is overloaded"."""
        if self.num_in_flight >= self.max_concurrent_requests:
            return False
        self.num_in_flight += 1
        return True

    def release(self) -> None:
        """Give back a permit taken with `try_acquire`."""
        assert self.num_in_flight > 0, "release() without a matching try_acquire()"
        self.num_in_flight -= 1
