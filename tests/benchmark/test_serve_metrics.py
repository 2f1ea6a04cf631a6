"""The serving benchmark's metric arithmetic on hand-made timelines, with exact expected numbers."""
from __future__ import annotations

import math

import pytest

from tgserve.benchmark.metrics_serve import (
    LatencyStats,
    RequestOutput,
    compute_metrics,
    e2el_s,
    itls_s,
    latency_stats_ms,
    meets_slos,
    parse_goodput,
    tpot_s,
    ttft_s,
)


def timeline(send_s: float, times_s: list[float], tokens: list[int], end_s: float, num_prompt_tokens: int = 10,
             reported: int | None = None) -> RequestOutput:
    return RequestOutput(is_success=True, send_time_s=send_s, event_times_s=times_s, event_num_tokens=tokens,
                         end_time_s=end_s, num_prompt_tokens=num_prompt_tokens, num_reported_output_tokens=reported)


def test_ttft_e2el_tpot_of_one_token_per_event():
    output = timeline(10.0, [10.25, 10.5, 10.75, 11.25], [1, 1, 1, 1], 11.25)
    assert ttft_s(output) == 0.25
    assert e2el_s(output) == 1.25
    assert output.num_output_tokens == 4
    assert tpot_s(e2el_s(output), ttft_s(output), output.num_output_tokens) == pytest.approx(1.0 / 3)
    assert itls_s(output.event_times_s, output.event_num_tokens) == pytest.approx([0.25, 0.25, 0.5])


def test_multi_token_events_count_as_arriving_together():
    # 2 tokens at 1.0, 3 at 1.25, 1 at 1.75: the first event's extra token has ITL 0; later events add a gap then 0s.
    assert itls_s([1.0, 1.25, 1.75], [2, 3, 1]) == pytest.approx([0.0, 0.25, 0.0, 0.0, 0.5])


def test_itls_skip_events_without_tokens_and_have_one_fewer_than_tokens():
    itls = itls_s([1.0, 1.5, 2.0, 3.0], [1, 0, 1, 2])
    assert itls == pytest.approx([1.0, 1.0, 0.0])
    assert len(itls) == 4 - 1
    assert itls_s([], []) == []


def test_tpot_needs_two_tokens():
    assert tpot_s(1.0, 0.2, 1) is None
    assert tpot_s(1.0, 0.2, 0) is None
    assert tpot_s(1.0, 0.2, 2) == pytest.approx(0.8)


def test_reported_output_tokens_override_event_counts():
    output = timeline(0.0, [0.5, 1.0], [1, 1], 1.0, reported=5)
    assert output.num_output_tokens == 5
    assert tpot_s(e2el_s(output), ttft_s(output), output.num_output_tokens) == pytest.approx(0.125)


def test_latency_stats_in_milliseconds():
    stats = latency_stats_ms([0.001, 0.002, 0.003, 0.004])
    assert stats.mean == pytest.approx(2.5)
    assert stats.median == pytest.approx(2.5)
    assert stats.std == pytest.approx(math.sqrt(1.25))
    assert stats.p90 == pytest.approx(3.7)  # numpy's linear interpolation: 1 + 0.9 * 3
    assert stats.p99 == pytest.approx(3.97)
    assert latency_stats_ms([]) == LatencyStats()


def test_compute_metrics_on_two_requests_and_a_failure():
    fast = timeline(0.0, [0.1, 0.2, 0.3], [1, 1, 1], 0.3, num_prompt_tokens=20)  # ttft 100, tpot 100, e2el 300
    slow = timeline(0.5, [1.5, 1.9], [1, 2], 1.9, num_prompt_tokens=30)  # ttft 1000, tpot 200, e2el 1400
    failed = RequestOutput(is_success=False, error="HTTP 500", num_prompt_tokens=99)
    metrics = compute_metrics([fast, slow, failed], duration_s=2.0, slos_ms={"ttft": 500.0})
    assert (metrics.num_completed, metrics.num_failed) == (2, 1)
    assert (metrics.total_input_tokens, metrics.total_output_tokens) == (50, 6)
    assert metrics.request_throughput_rps == pytest.approx(1.0)
    assert metrics.output_throughput_tok_s == pytest.approx(3.0)
    assert metrics.total_token_throughput_tok_s == pytest.approx(28.0)
    assert metrics.request_goodput_rps == pytest.approx(0.5)  # only `fast` meets ttft <= 500 ms
    assert metrics.ttft_ms.mean == pytest.approx(550.0)
    assert metrics.tpot_ms.mean == pytest.approx(150.0)
    assert metrics.e2el_ms.median == pytest.approx(850.0)
    assert metrics.itl_ms.mean == pytest.approx((100 + 100 + 400 + 0) / 4)


def test_goodput_is_none_without_slos_and_zero_when_nothing_completes():
    assert compute_metrics([timeline(0.0, [0.1], [1], 0.1)], 1.0).request_goodput_rps is None
    metrics = compute_metrics([RequestOutput(error="refused")], 1.0, {"tpot": 10.0})
    assert metrics.num_completed == 0 and metrics.request_goodput_rps == 0.0
    assert metrics.ttft_ms == LatencyStats()


def test_goodput_requires_every_slo():
    output = timeline(0.0, [0.1, 0.2, 0.3], [1, 1, 1], 0.3)  # ttft 100 ms, tpot 100 ms, e2el 300 ms
    assert compute_metrics([output], 1.0, {"ttft": 100.0, "tpot": 100.0}).request_goodput_rps == 1.0
    assert compute_metrics([output], 1.0, {"ttft": 100.0, "tpot": 99.0}).request_goodput_rps == 0.0
    assert compute_metrics([output], 1.0, {"e2el": 299.0}).request_goodput_rps == 0.0


def test_meets_slos_lets_a_missing_tpot_pass():
    assert meets_slos({"ttft": 10.0, "tpot": None, "e2el": 10.0}, {"tpot": 1.0})
    assert not meets_slos({"ttft": 10.0, "tpot": None, "e2el": 10.0}, {"ttft": 1.0})


def test_parse_goodput():
    assert parse_goodput(["ttft:500", "TPOT:50.5", "e2el:2000"]) == {"ttft": 500.0, "tpot": 50.5, "e2el": 2000.0}
    for bad in (["itl:5"], ["ttft"], ["ttft:fast"], ["ttft:0"], ["ttft:-1"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)
