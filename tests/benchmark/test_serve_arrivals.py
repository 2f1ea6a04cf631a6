"""The serving benchmark's arrival process: Poisson and gamma gaps, seeds, infinite rate, rate parsing."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tgserve.benchmark.arrivals import format_rate, inter_arrival_delays_s, parse_request_rates, send_offsets_s

NUM_SAMPLES = 40_000


@pytest.mark.parametrize("request_rate", [0.5, 4.0, 100.0])
@pytest.mark.parametrize("burstiness", [0.5, 1.0, 3.0])
def test_mean_inter_arrival_is_one_over_rate(request_rate, burstiness):
    delays_s = inter_arrival_delays_s(NUM_SAMPLES, request_rate, burstiness, seed=1)
    assert delays_s.shape == (NUM_SAMPLES,)
    assert delays_s.mean() == pytest.approx(1.0 / request_rate, rel=0.03)
    assert (delays_s >= 0).all()


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_coefficient_of_variation_is_one_over_sqrt_k(burstiness):
    delays_s = inter_arrival_delays_s(NUM_SAMPLES, 2.0, burstiness, seed=2)
    assert delays_s.std() / delays_s.mean() == pytest.approx(1.0 / math.sqrt(burstiness), rel=0.05)


def test_same_seed_same_schedule_other_seed_other_schedule():
    first = send_offsets_s(100, 3.0, 0.7, seed=5)
    assert np.array_equal(first, send_offsets_s(100, 3.0, 0.7, seed=5))
    assert not np.array_equal(first, send_offsets_s(100, 3.0, 0.7, seed=6))


def test_infinite_rate_sends_everything_at_once():
    assert np.array_equal(inter_arrival_delays_s(7, math.inf), np.zeros(7))
    assert np.array_equal(send_offsets_s(7, math.inf, 0.5), np.zeros(7))


def test_offsets_start_at_zero_and_add_the_gaps():
    delays_s = inter_arrival_delays_s(5, 2.0, 1.0, seed=3)
    offsets_s = send_offsets_s(5, 2.0, 1.0, seed=3)
    assert offsets_s[0] == 0.0
    assert offsets_s == pytest.approx(np.cumsum(np.concatenate(([0.0], delays_s[:-1]))))


@settings(max_examples=50, deadline=None)
@given(num_requests=st.integers(0, 50), request_rate=st.floats(0.01, 1000.0), burstiness=st.floats(0.1, 10.0),
       seed=st.integers(0, 2**32 - 1))
def test_offsets_are_sorted_and_one_per_request(num_requests, request_rate, burstiness, seed):
    offsets_s = send_offsets_s(num_requests, request_rate, burstiness, seed)
    assert offsets_s.shape == (num_requests,)
    assert (np.diff(offsets_s) >= 0).all()


def test_bad_parameters_raise():
    with pytest.raises(ValueError):
        inter_arrival_delays_s(3, 1.0, burstiness=0.0)
    with pytest.raises(ValueError):
        inter_arrival_delays_s(3, -1.0)


def test_parse_request_rates():
    assert parse_request_rates("1, 2,4,inf") == [1.0, 2.0, 4.0, math.inf]
    assert parse_request_rates("0.5") == [0.5]
    for bad in ("", "0", "-2", "fast", "1,,x"):
        with pytest.raises(ValueError):
            parse_request_rates(bad)


def test_format_rate():
    assert [format_rate(rate) for rate in (4.0, 0.5, math.inf)] == ["4", "0.5", "inf"]
