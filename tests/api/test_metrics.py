"""TGI's Prometheus metrics without a model: names, types, buckets, the text format, the engine
observer's prefill/decode mapping, how `metered_stream` counts each way a request ends, and that
core/ stays free of the API's monitoring libraries."""
from __future__ import annotations

import ast
import asyncio
import re
from contextlib import aclosing
from pathlib import Path

import pytest

from tgserve.api.shared.metrics import DURATION_BUCKETS_S, ServerMetrics, linear_buckets
from tgserve.api.shared.metrics_engine import EngineMetrics
from tgserve.api.shared.metrics_requests import metered_stream
from tgserve.api.shared.timing import RequestTimer
from tgserve.core.errors import GenerationError, RequestRejected
from tgserve.core.limits import RuntimeLimits
from tgserve.core.request import Finish, TokenEvent
from tgserve.core.step_stats import StepStats

LIMITS = RuntimeLimits(max_input_tokens=1000, max_total_tokens=2000, max_batch_prefill_tokens=512,
                       max_batch_total_tokens=8192, max_batch_size=None, num_blocks=513, block_size=16)
SAMPLE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def samples(metrics: ServerMetrics) -> dict[str, float]:
    """`name{labels}` -> value for every sample line of the rendered text."""
    found = {}
    for line in metrics.render().decode().splitlines():
        if not line.startswith("#"):
            match = SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            key = match["name"] + (f"{{{match['labels']}}}" if match["labels"] else "")
            found[key] = float(match["value"])
    return found


def bucket_bounds(metrics: ServerMetrics, name: str) -> list[float]:
    bounds = [re.search(r'le="([^"]+)"', key)[1] for key in samples(metrics) if key.startswith(name + "_bucket")]
    return [float(b) for b in bounds if b != "+Inf"]


def stats(**overrides) -> StepStats:
    values = dict(num_seqs=1, num_new_seqs=0, num_tokens=1, num_prefill_tokens=0, num_running=1, num_waiting=0,
                  max_batch_tokens=64, schedule_s=0.001, forward_s=0.02, update_s=0.002, filter_s=0.0005,
                  duration_s=0.025, is_ok=True)
    return StepStats(**{**values, **overrides})


def test_counters_keep_tgi_names_and_types():
    text = ServerMetrics(LIMITS).render().decode()
    assert "# TYPE tgi_request_count counter" in text and "\ntgi_request_count 0.0\n" in text
    assert not re.search(r"_total[ {]", text) and "_created" not in text
    assert "# TYPE tgi_request_duration histogram" in text and "# TYPE tgi_queue_size gauge" in text
    assert 'tgi_request_failure{err="dropped"} 0.0' in text  # failure kinds exist before the first one
    assert samples(ServerMetrics(LIMITS))["tgi_batch_max_total_tokens"] == 8192


def test_tgi_bucket_layouts():
    metrics = ServerMetrics(LIMITS)
    assert len(DURATION_BUCKETS_S) == 35 and DURATION_BUCKETS_S[0] == pytest.approx(0.00015)
    assert DURATION_BUCKETS_S[-1] / DURATION_BUCKETS_S[-2] == pytest.approx(1.5)
    assert bucket_bounds(metrics, "tgi_request_duration") == pytest.approx(DURATION_BUCKETS_S)
    assert bucket_bounds(metrics, "tgi_request_input_length") == pytest.approx(linear_buckets(1000))
    assert bucket_bounds(metrics, "tgi_request_input_length")[:2] == [10.0, 20.0]
    for name in ("tgi_request_generated_tokens", "tgi_request_max_new_tokens"):
        bounds = bucket_bounds(metrics, name)
        assert len(bounds) == 100 and bounds[-1] == 2000.0
    assert bucket_bounds(metrics, "tgi_batch_next_size") == [float(n) for n in range(1, 1025)]


def test_each_app_has_its_own_registry():
    first, second = ServerMetrics(LIMITS), ServerMetrics(LIMITS)
    first.record_request()
    assert samples(first)["tgi_request_count"] == 1 and samples(second)["tgi_request_count"] == 0


def test_request_success_records_the_timer_split():
    metrics = ServerMetrics(LIMITS)
    metrics.record_validated(input_length=12, max_new_tokens=20)
    metrics.record_success((1.0, 0.1, 0.2, 0.7), generated_tokens=7)
    got = samples(metrics)
    assert got["tgi_request_success"] == 1 and got["tgi_request_duration_sum"] == 1.0
    assert got["tgi_request_validation_duration_sum"] == 0.1 and got["tgi_request_queue_duration_sum"] == 0.2
    assert got["tgi_request_mean_time_per_token_duration_sum"] == pytest.approx(0.1)
    assert got["tgi_request_input_length_sum"] == 12 and got["tgi_request_max_new_tokens_sum"] == 20
    assert got["tgi_request_generated_tokens_sum"] == 7
    assert got["tgi_request_skipped_tokens_count"] == 0  # observed per step, not per request


def test_skipped_tokens_are_observed_once_per_step_as_tgi():
    """Steps gave a request 1, 3, 1 and 2 tokens (events carry 1; 0, 0, 3; 1; 0, 2): TGI observes
    n - 1 per step, 0 2 0 1, into buckets 0..speculate."""
    metrics = ServerMetrics(LIMITS, speculate=2)
    assert bucket_bounds(metrics, "tgi_request_skipped_tokens") == [0.0, 1.0, 2.0]

    async def events():
        for index, num_step_tokens in enumerate([1, 0, 0, 3, 1, 0, 2], start=1):
            finish = Finish("length", index, None, "x" * index) if index == 7 else None
            yield TokenEvent(120, "x", -0.1, False, index, finish=finish, num_step_tokens=num_step_tokens)

    asyncio.run(_consume(metrics, events()))
    got = samples(metrics)
    assert got["tgi_request_skipped_tokens_count"] == 4 and got["tgi_request_skipped_tokens_sum"] == 3
    assert got['tgi_request_skipped_tokens_bucket{le="0.0"}'] == 2
    assert got['tgi_request_skipped_tokens_bucket{le="1.0"}'] == 3


def test_engine_steps_become_prefill_and_decode_batches():
    metrics = ServerMetrics(LIMITS)
    observer = EngineMetrics(metrics)
    observer.on_step(stats(num_new_seqs=1, num_tokens=30, num_prefill_tokens=30))  # a new batch
    observer.on_step(stats(num_running=3, num_waiting=2, max_batch_tokens=300))  # decode
    observer.on_step(stats(num_seqs=3, num_new_seqs=2, num_tokens=41, num_prefill_tokens=40, num_running=3))
    observer.on_step(stats(num_seqs=3, num_running=3, is_ok=False))
    got = samples(metrics)
    assert got['tgi_batch_inference_count{method="prefill"}'] == 2
    assert got['tgi_batch_inference_count{method="decode"}'] == 2
    assert got['tgi_batch_inference_failure{method="decode"}'] == 1
    assert got['tgi_batch_inference_success{method="decode"}'] == 1
    assert got['tgi_batch_forward_duration_count{method="prefill"}'] == 2
    assert got['tgi_batch_inference_duration_sum{method="decode"}'] == pytest.approx(0.025)
    assert got["tgi_batch_next_size_count"] == 2 and got["tgi_batch_next_size_sum"] == 3
    assert got['tgi_batch_concat{reason="chunking"}'] == 1  # only the two that joined a running batch
    assert got['tgi_batch_concat_duration_count{method="decode"}'] == 1
    assert (got["tgi_batch_current_size"], got["tgi_batch_current_max_tokens"], got["tgi_queue_size"]) == (3, 64, 0)
    observer.on_idle()
    got = samples(metrics)
    assert (got["tgi_batch_current_size"], got["tgi_batch_current_max_tokens"], got["tgi_queue_size"]) == (0, 0, 0)


def _events(num_tokens: int, *, is_finished: bool = True, error: Exception | None = None):
    async def events():
        for index in range(1, num_tokens + 1):
            is_last = is_finished and index == num_tokens
            finish = Finish("length", index, None, "x" * index, queue_s=0.01, inference_s=0.02) if is_last else None
            yield TokenEvent(120, "x", -0.1, False, index, finish=finish)
        if error is not None:
            raise error
    return events()


async def _consume(metrics: ServerMetrics, events, max_events: int | None = None) -> None:
    async with aclosing(metered_stream(metrics, events, RequestTimer())) as stream:
        count = 0
        async for _ in stream:
            count += 1
            if count == max_events:
                return


@pytest.mark.parametrize("events, max_events, outcome", [
    (lambda: _events(3), None, "tgi_request_success"),
    (lambda: _events(3), 3, "tgi_request_success"),  # the consumer stops right after the last token
    (lambda: _events(5), 2, 'tgi_request_failure{err="dropped"}'),
    (lambda: _events(2, is_finished=False), None, 'tgi_request_failure{err="incomplete"}'),
    (lambda: _events(1, is_finished=False, error=GenerationError("boom")), None,
     'tgi_request_failure{err="generation"}'),
    (lambda: _events(0, is_finished=False, error=RequestRejected("too long")), None,
     'tgi_request_failure{err="validation"}'),
    (lambda: _events(1, is_finished=False, error=ValueError("an engine bug")), None,
     'tgi_request_failure{err="generation"}'),  # only the typed rejection counts as the client's
])
def test_metered_stream_records_one_outcome(events, max_events, outcome):
    metrics = ServerMetrics(LIMITS)
    try:
        asyncio.run(_consume(metrics, events(), max_events))
    except (GenerationError, RequestRejected, ValueError):
        pass
    got = samples(metrics)
    outcomes = {key: value for key, value in got.items()
                if key == "tgi_request_success" or key.startswith("tgi_request_failure")}
    assert {key for key, value in outcomes.items() if value} == {outcome}
    assert sum(outcomes.values()) == 1


def test_cancelled_consumer_counts_as_dropped():
    metrics = ServerMetrics(LIMITS)

    async def never_finishes():
        yield TokenEvent(120, "x", -0.1, False, 1)
        await asyncio.sleep(60)
        yield TokenEvent(120, "x", -0.1, False, 2)

    async def main() -> None:
        task = asyncio.ensure_future(_consume(metrics, never_finishes()))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    assert samples(metrics)['tgi_request_failure{err="dropped"}'] == 1


def test_core_imports_no_monitoring_or_http_library():
    banned = ("prometheus_client", "opentelemetry", "fastapi", "starlette", "uvicorn", "tgserve.api")
    core = Path(__file__).resolve().parents[2] / "core"
    for path in core.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad = [n for n in names if any(n == b or n.startswith(b + ".") for b in banned)]
            assert not bad, f"{path.name} imports {bad}"
