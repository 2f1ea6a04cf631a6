"""TGI's Prometheus metrics: the same names, types, labels and buckets (TGI-CONTRACT section 3).

One `ServerMetrics` per app, each with its own `CollectorRegistry`, so tests can build several
apps in one process. Request-level numbers are recorded by the API (`metrics_requests`), engine-side
ones by the engine's step observer (`metrics_engine`). `render_text` writes the Prometheus text
format the way TGI's exporter does: counters keep their bare names (`tgi_request_count`, not
prometheus-client's `tgi_request_count_total`), which is what TGI's Grafana dashboard queries.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.utils import floatToGoString

from tgserve.core.limits import RuntimeLimits

# TGI (router/src/server.rs): every `*_duration` histogram has 35 geometric buckets 0.0001 * 1.5^k s, k = 1..35.
DURATION_BUCKETS_S = tuple(0.0001 * 1.5 ** k for k in range(1, 36))
BATCH_SIZE_BUCKETS = tuple(float(size) for size in range(1, 1025))  # tgi_batch_next_size: 1..1024
FAILURE_ERRORS = ("validation", "overloaded", "generation", "incomplete", "dropped", "template")
METHODS = ("prefill", "decode")
CONCAT_REASONS = ("backpressure", "wait_exceeded", "chunking")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def linear_buckets(max_value: int, num_buckets: int = 100) -> tuple[float, ...]:
    """TGI's token-count buckets: `num_buckets` equal steps up to `max_value`."""
    return tuple(max_value / num_buckets * (i + 1) for i in range(num_buckets))


class ServerMetrics:
    """Every metric TGI exports, registered in a registry of this object's own."""

    def __init__(self, limits: RuntimeLimits, speculate: int = 0):
        self.registry = CollectorRegistry()
        self._add_request_metrics(limits, speculate)
        self._add_batch_metrics()
        self.batch_max_total_tokens.set(limits.max_batch_total_tokens)

    def _counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(name, doc, labels, registry=self.registry)

    def _histogram(self, name: str, doc: str, buckets, labels: tuple[str, ...] = ()) -> Histogram:
        return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

    def _gauge(self, name: str, doc: str) -> Gauge:
        return Gauge(name, doc, registry=self.registry)

    def _add_request_metrics(self, limits: RuntimeLimits, speculate: int) -> None:
        self.request_count = self._counter("tgi_request_count", "Generation requests received")
        self.request_success = self._counter("tgi_request_success", "Generation requests that finished")
        self.request_failure = self._counter("tgi_request_failure", "Generation requests that failed", ("err",))
        for err in FAILURE_ERRORS:  # every series exists from the start, so increase() sees the first one
            self.request_failure.labels(err)
        seconds = DURATION_BUCKETS_S
        self.request_duration = self._histogram("tgi_request_duration", "End-to-end request seconds", seconds)
        self.request_validation_duration = self._histogram(
            "tgi_request_validation_duration", "Seconds validating and tokenizing", seconds)
        self.request_queue_duration = self._histogram(
            "tgi_request_queue_duration", "Seconds queued before the first step", seconds)
        self.request_inference_duration = self._histogram(
            "tgi_request_inference_duration", "Seconds from the first step to the last token", seconds)
        self.request_mean_time_per_token_duration = self._histogram(
            "tgi_request_mean_time_per_token_duration", "Inference seconds per generated token", seconds)
        self.request_input_length = self._histogram(
            "tgi_request_input_length", "Prompt tokens per request", linear_buckets(limits.max_input_tokens))
        self.request_generated_tokens = self._histogram(
            "tgi_request_generated_tokens", "Generated tokens per request", linear_buckets(limits.max_total_tokens))
        self.request_max_new_tokens = self._histogram(
            "tgi_request_max_new_tokens", "max_new_tokens per request", linear_buckets(limits.max_total_tokens))
        # TGI (backends/v3/src/backend.rs): one observation per request per step, the tokens the step
        # gave it less one; buckets 0..speculate (router/src/server.rs).
        # Not TGI's (vLLM's prefix_cache_hits): prompt tokens of finished requests whose K/V were reused;
        # beside tgi_request_input_length_sum it gives the cache's hit rate.
        self.request_cached_tokens = self._counter(
            "tgserve_request_cached_tokens", "Prompt tokens of finished requests reused from the prefix cache")
        self.request_skipped_tokens = self._histogram(
            "tgi_request_skipped_tokens", "Speculated tokens accepted per step beyond the first",
            tuple(float(n) for n in range(speculate + 1)))

    def _add_batch_metrics(self) -> None:
        self.batch_current_size = self._gauge("tgi_batch_current_size", "Sequences in the running batch")
        self.batch_current_max_tokens = self._gauge(
            "tgi_batch_current_max_tokens", "KV-cache tokens reserved by the running batch")
        self.queue_size = self._gauge("tgi_queue_size", "Requests waiting for a batch")
        self.batch_max_total_tokens = self._gauge("tgi_batch_max_total_tokens", "KV-cache capacity in tokens")
        # Not one of TGI's: the blocks themselves, read from the block manager at scrape time (see
        # `watch_kv_cache`), so a leak shows even when the batch gauges read zero.
        self.kv_cache_blocks_used = self._gauge("tgserve_kv_cache_blocks_used", "KV-cache blocks held by requests")
        self.kv_cache_blocks_cached = self._gauge(
            "tgserve_kv_cache_blocks_cached", "Free KV-cache blocks whose content a new request may still reuse")
        self.batch_next_size = self._histogram("tgi_batch_next_size", "Requests admitted from the queue at once",
                                               BATCH_SIZE_BUCKETS)
        method = ("method",)
        self.batch_inference_count = self._counter("tgi_batch_inference_count", "Engine steps", method)
        self.batch_inference_success = self._counter("tgi_batch_inference_success", "Engine steps that worked", method)
        self.batch_inference_failure = self._counter("tgi_batch_inference_failure", "Engine steps that failed", method)
        for counter in (self.batch_inference_count, self.batch_inference_success, self.batch_inference_failure):
            for name in METHODS:
                counter.labels(name)
        seconds = DURATION_BUCKETS_S
        self.batch_inference_duration = self._histogram(
            "tgi_batch_inference_duration", "Seconds per engine step", seconds, method)
        self.batch_forward_duration = self._histogram(
            "tgi_batch_forward_duration", "Seconds in the model forward and sampling", seconds, method)
        self.batch_decode_duration = self._histogram(
            "tgi_batch_decode_duration", "Seconds turning sampled ids into token events", seconds, method)
        self.batch_filter_duration = self._histogram(
            "tgi_batch_filter_duration", "Seconds removing finished requests from the batch", seconds, method)
        # Not TGI's: a sharded server's communication (`core/distributed/collective_clock`), rank 0's host
        # seconds inside the step's collectives and their number; no series on one rank.
        self.batch_collective_duration = self._histogram(
            "tgserve_batch_collective_duration", "Seconds of an engine step inside collectives (sharded)",
            seconds, method)
        self.batch_collectives = self._counter("tgserve_batch_collectives", "Collectives run by engine steps", method)
        self.batch_concat = self._counter("tgi_batch_concat", "New requests joining a running batch", ("reason",))
        for reason in CONCAT_REASONS:
            self.batch_concat.labels(reason)
        self.batch_concat_duration = self._histogram(
            "tgi_batch_concat_duration", "Seconds merging new requests into a running batch", seconds, method)

    def watch_kv_cache(self, num_used_blocks: Callable[[], int], num_cached_blocks: Callable[[], int]) -> None:
        """Read `tgserve_kv_cache_blocks_used` / `_cached` from the block manager at every scrape."""
        self.kv_cache_blocks_used.set_function(num_used_blocks)
        self.kv_cache_blocks_cached.set_function(num_cached_blocks)

    def record_request(self) -> None:
        """A generation request arrived (counted before validation and admission, as TGI does)."""
        self.request_count.inc()

    def record_validated(self, input_length: int, max_new_tokens: int) -> None:
        """A request passed validation and goes to the engine with these token counts."""
        self.request_input_length.observe(input_length)
        self.request_max_new_tokens.observe(max_new_tokens)

    def record_failure(self, err: str) -> None:
        """A request failed; `err` is one of `FAILURE_ERRORS`."""
        self.request_failure.labels(err).inc()

    def record_success(self, split_s: tuple[float, float, float, float], generated_tokens: int,
                       cached_tokens: int = 0) -> None:
        """A request finished; `split_s` is `RequestTimer.split_s`: (total, validation, queue, inference)."""
        total_s, validation_s, queue_s, inference_s = split_s
        self.request_success.inc()
        self.request_cached_tokens.inc(cached_tokens)
        self.request_duration.observe(total_s)
        self.request_validation_duration.observe(validation_s)
        self.request_queue_duration.observe(queue_s)
        self.request_inference_duration.observe(inference_s)
        self.request_mean_time_per_token_duration.observe(inference_s / max(generated_tokens, 1))
        self.request_generated_tokens.observe(generated_tokens)

    def record_step_tokens(self, num_tokens: int) -> None:
        """One engine step gave a request `num_tokens` tokens (`TokenEvent.num_step_tokens`, >= 1)."""
        self.request_skipped_tokens.observe(num_tokens - 1)

    def render(self) -> bytes:
        """The registry in Prometheus text format (see `render_text`)."""
        return render_text(self.registry)


def render_text(registry: CollectorRegistry) -> bytes:
    """Prometheus text exposition format 0.0.4 as TGI writes it: bare counter names, no `_created`."""
    lines: list[str] = []
    for family in registry.collect():
        documentation = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
        lines += [f"# HELP {family.name} {documentation}", f"# TYPE {family.name} {family.type}"]
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            name = family.name if family.type == "counter" else sample.name  # x_total -> x
            lines.append(f"{name}{_labels(sample.labels)} {floatToGoString(sample.value)}")
    return ("\n".join(lines) + "\n").encode()


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    escaped = (f'{key}="{_escape(value)}"' for key, value in labels.items())
    return "{" + ",".join(escaped) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
