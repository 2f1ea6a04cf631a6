"""A real server's Prometheus text, read and waited on (test helper).

The end-to-end tests wait for what the server reports (a request counted as dropped, the batch
empty) instead of asserting that it happened within so many seconds: a busy 2-core machine stretches
every duration, but not the order of events. `wait_for_metrics` polls until its condition holds;
its timeout only bounds a test that would otherwise hang.
"""
from __future__ import annotations

import time
from typing import Callable

import httpx

from tgserve.benchmark.prometheus_text import Samples, parse_samples, value  # noqa: F401 (re-exported)

WAIT_TIMEOUT_S = 120.0  # only bounds a hang; a healthy server answers within milliseconds to seconds
POLL_INTERVAL_S = 0.05


def scrape(url: str) -> tuple[Samples, dict[str, str]]:
    """(samples keyed by (name, labels), family types) from `url`/metrics."""
    return parse_samples(httpx.get(f"{url}/metrics", timeout=10).text)


def wait_for_metrics(url: str, is_ready: Callable[[Samples], bool], what: str,
                     timeout_s: float = WAIT_TIMEOUT_S) -> Samples:
    """Scrape `url` until `is_ready(samples)`; return those samples. Fails naming `what` on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples, _ = scrape(url)
        if is_ready(samples):
            return samples
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(POLL_INTERVAL_S)


def is_idle(samples: Samples) -> bool:
    """No request runs or waits in the engine."""
    return value(samples, "tgi_batch_current_size") == value(samples, "tgi_queue_size") == 0


def num_decode_steps(samples: Samples) -> float:
    """Engine steps that computed decode tokens only: with one request running, one per token it
    generated after the first (that one comes from its prefill step)."""
    return value(samples, "tgi_batch_inference_count", method="decode")


def num_dropped(samples: Samples) -> float:
    """Requests whose client went away before their last token."""
    return value(samples, "tgi_request_failure", err="dropped")


def num_succeeded(samples: Samples) -> float:
    """Requests that ran to their last token."""
    return value(samples, "tgi_request_success")


def num_used_kv_blocks(samples: Samples) -> float:
    """KV-cache blocks that requests hold, read from the block manager at scrape time."""
    return value(samples, "tgserve_kv_cache_blocks_used")


def is_released(samples: Samples) -> bool:
    """Nothing runs or waits in the engine and every KV block is back in the free pool."""
    return is_idle(samples) and num_used_kv_blocks(samples) == 0
