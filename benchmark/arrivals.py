"""When the serving benchmark sends each request: Poisson or gamma arrivals at a request rate.

As vLLM's benchmark_serving: the gaps between requests are gamma-distributed with shape
`burstiness` (k) and scale 1 / (rate * k), so their mean is 1 / rate whatever k is, and their
coefficient of variation is 1 / sqrt(k). k = 1 is a Poisson process (exponential gaps); k < 1 is
burstier, k > 1 more regular. An infinite rate sends every request at once.
"""
from __future__ import annotations

import math

import numpy as np


def parse_request_rates(text: str) -> list[float]:
    """`"1,2,4,inf"` -> `[1.0, 2.0, 4.0, inf]`; each rate in requests per second, > 0."""
    rates = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            rate = float(part)
        except ValueError:
            raise ValueError(f"a request rate is a number or inf, got {part!r}") from None
        if not rate > 0:
            raise ValueError(f"a request rate must be > 0, got {part!r}")
        rates.append(rate)
    if not rates:
        raise ValueError("no request rate given")
    return rates


def inter_arrival_delays_s(num_requests: int, request_rate: float, burstiness: float = 1.0,
                           seed: int = 0) -> np.ndarray:
    """Gaps between successive requests, [num_requests] seconds; all zero for an infinite rate.

    Deterministic for a given seed. `burstiness` is the gamma shape k (1.0: Poisson).
    """
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(request_rate):
        return np.zeros(num_requests)
    if request_rate <= 0:
        raise ValueError(f"request rate must be > 0, got {request_rate}")
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_requests)


def send_offsets_s(num_requests: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """When each request is due, [num_requests] seconds after the benchmark starts.

    The first request goes at 0; request i waits the gaps drawn for requests 0..i-1 (as vLLM's
    generator, which yields a request and then sleeps one gap).
    """
    delays_s = inter_arrival_delays_s(num_requests, request_rate, burstiness, seed)
    return np.concatenate(([0.0], np.cumsum(delays_s)[:-1]))[:num_requests]


def format_rate(request_rate: float) -> str:
    """A rate as a label: `4` for 4.0, `0.5`, `inf`."""
    if math.isinf(request_rate):
        return "inf"
    return f"{request_rate:g}"
