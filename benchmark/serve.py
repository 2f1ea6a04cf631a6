"""The serving benchmark's load generator: send a dataset at a request rate (or a sweep of rates).

Requests are due at Poisson / gamma arrival times (`arrivals`); `max_concurrency` caps how many
are in flight, and a request's clock starts when it is actually sent. One warm-up request checks
the server first. Each rate runs the whole dataset and yields one `RateResult`.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, replace
from typing import Callable

import httpx
from tqdm import tqdm

from tgserve.benchmark.arrivals import format_rate, send_offsets_s
from tgserve.benchmark.conversations import Conversation, run_conversation
from tgserve.benchmark.datasets import SampleRequest, TextTokenizer
from tgserve.benchmark.metrics_serve import RequestOutput, ServeMetrics, compute_metrics
from tgserve.benchmark.serve_backends import BACKENDS, send_request

CONNECT_TIMEOUT_S = 30.0
READ_TIMEOUT_S = 6 * 60 * 60.0  # a slow server under heavy load may take long per token; vLLM waits 6 h


@dataclass(frozen=True, slots=True)
class ServeBenchConfig:
    """How to load the server; built from the `benchmark serve` flags."""

    backend: str  # a key of serve_backends.BACKENDS
    base_url: str  # e.g. http://127.0.0.1:3000
    model: str | None  # model name for OpenAI routes
    request_rates: tuple[float, ...]  # requests per second, inf for all at once; one run per rate
    burstiness: float = 1.0  # gamma shape of the inter-arrival times (1.0: Poisson)
    max_concurrency: int | None = None  # cap on requests in flight; None: no cap
    seed: int = 0
    force_output_len: bool = False  # ask the server to generate exactly the requested tokens
    goodput_slos_ms: tuple[tuple[str, float], ...] = ()  # (metric, limit in ms) pairs
    is_progress_shown: bool = True
    # Counts the prompt tokens of a multi-turn conversation's later turns (None: words, as the datasets).
    tokenizer: TextTokenizer | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; one of {', '.join(BACKENDS)}")
        if self.max_concurrency is not None and self.max_concurrency <= 0:
            raise ValueError(f"max concurrency must be > 0, got {self.max_concurrency}")


@dataclass(frozen=True, slots=True)
class RateResult:
    """One run of the dataset at one request rate."""

    request_rate: float  # requests per second (inf: all at once)
    metrics: ServeMetrics
    outputs: list[RequestOutput]  # [num_prompts] in dataset order; conversations: each one's turns in order


def make_client(max_concurrency: int | None) -> httpx.AsyncClient:
    """An HTTP client with no connection limit below the concurrency cap."""
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
    timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S, pool=None)
    return httpx.AsyncClient(limits=limits, timeout=timeout)


async def check_server(client: httpx.AsyncClient, config: ServeBenchConfig, sample: SampleRequest) -> None:
    """Send one request and raise RuntimeError with the server's answer if it fails."""
    output = await send_request(client, BACKENDS[config.backend], config.base_url, config.model, sample,
                                config.force_output_len)
    if not output.is_success:
        raise RuntimeError(f"the test request to {config.base_url} failed: {output.error}")


async def resolve_model(client: httpx.AsyncClient, base_url: str) -> str:
    """The first model an OpenAI-route server lists at GET /v1/models."""
    try:
        response = await client.get(base_url.rstrip("/") + "/v1/models")
        response.raise_for_status()
        models = response.json().get("data") or []
    except (httpx.HTTPError, ValueError) as error:
        raise RuntimeError(f"cannot list {base_url}/v1/models ({error}); pass --model") from error
    if not models:
        raise RuntimeError(f"{base_url}/v1/models lists no model; pass --model")
    return models[0]["id"]


async def run_rate(client: httpx.AsyncClient, config: ServeBenchConfig,
                   samples: list[SampleRequest] | list[Conversation], request_rate: float) -> RateResult:
    """Send every sample (or conversation: its turns one after another) on its arrival schedule; return
    the outputs (a conversation's in turn order) and their metrics."""
    backend = BACKENDS[config.backend]
    offsets_s = send_offsets_s(len(samples), request_rate, config.burstiness, config.seed)
    semaphore = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    num_requests = sum(len(s.user_turns) if isinstance(s, Conversation) else 1 for s in samples)
    progress = tqdm(total=num_requests, desc=f"rate {format_rate(request_rate)}", unit="req",
                    disable=not config.is_progress_shown)
    start_s = time.perf_counter()

    async def one(sample: SampleRequest | Conversation, offset_s: float) -> list[RequestOutput]:
        await asyncio.sleep(max(0.0, start_s + offset_s - time.perf_counter()))
        if isinstance(sample, Conversation):
            outputs = await run_conversation(client, backend, config.base_url, config.model, sample,
                                             config.force_output_len, config.tokenizer, semaphore)
        else:
            async with semaphore or contextlib.nullcontext():
                outputs = [await send_request(client, backend, config.base_url, config.model, sample,
                                              config.force_output_len)]
        progress.update(len(outputs))
        return outputs

    per_sample = await asyncio.gather(*(one(sample, float(offset)) for sample, offset in zip(samples, offsets_s)))
    duration_s = time.perf_counter() - start_s
    progress.close()
    outputs = [output for sample_outputs in per_sample for output in sample_outputs]
    metrics = compute_metrics(outputs, duration_s, dict(config.goodput_slos_ms))
    return RateResult(request_rate, metrics, outputs)


async def run_sweep(config: ServeBenchConfig, samples: list[SampleRequest] | list[Conversation],
                    on_result: Callable[[RateResult], None] | None = None,
                    ) -> tuple[ServeBenchConfig, list[RateResult]]:
    """Check the server, then run the dataset once per rate; `on_result(result)` after each run.

    Returns the config as run (an OpenAI model name looked up when none was given) and the results.
    """
    if not samples:
        raise ValueError("the dataset is empty")
    results = []
    async with make_client(config.max_concurrency) as client:
        if config.model is None and config.backend.startswith("openai"):
            config = replace(config, model=await resolve_model(client, config.base_url))
        first = samples[0]  # a conversation's check shares nothing with it: no prefix is cached before the run
        await check_server(client, config, first if isinstance(first, SampleRequest) else SampleRequest("Hello", 1, 1))
        for request_rate in config.request_rates:
            result = await run_rate(client, config, samples, request_rate)
            results.append(result)
            if on_result is not None:
                on_result(result)
    return config, results

