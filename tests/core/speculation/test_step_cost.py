"""The decoding-step cost fit behind the adaptive rule's knee: it recovers a known cost line, stays
silent where the steps cannot place one, follows a change of cost, and moves the proposer's knee."""
from __future__ import annotations

import random

import pytest

from tgserve.core.speculation.acceptance import Proposer
from tgserve.core.speculation.adaptive import MAX_KNEE_ROWS, MIN_KNEE_ROWS, AdaptiveProposer
from tgserve.core.speculation.step_cost import MIN_WEIGHT, StepCostFit


def cost_s(num_rows: int, fixed_s: float = 0.015, per_row_s: float = 0.001) -> float:
    return fixed_s + per_row_s * num_rows


def test_recovers_the_knee_of_a_cost_line_through_noise():
    rng = random.Random(0)
    fit = StepCostFit()
    for _ in range(300):
        rows = rng.randint(4, 24)
        fit.add(rows, cost_s(rows) * rng.uniform(0.95, 1.05))
    assert fit.knee_rows() == pytest.approx(15.0, rel=0.15)


def test_silent_until_the_steps_can_place_a_line():
    fit = StepCostFit()
    assert fit.knee_rows() is None
    for i in range(int(MIN_WEIGHT) - 1):
        fit.add(8 + 8 * (i % 2), cost_s(8 + 8 * (i % 2)))
    assert fit.knee_rows() is None  # too few steps
    alike = StepCostFit()
    for i in range(200):
        alike.add(16 + i % 2, cost_s(16 + i % 2))
    assert alike.knee_rows() is None  # rows too alike to tell a slope from noise
    noise = StepCostFit()
    for i in range(200):
        noise.add(4 + 8 * (i % 3), 0.030 - 0.0001 * (i % 3))
    assert noise.knee_rows() is None  # more rows, not slower: no cost to fit
    rng = random.Random(1)
    busy = StepCostFit()
    for _ in range(300):  # another process takes the cores: steps gain 0-200 ms whatever their rows
        rows = rng.randint(4, 24)
        busy.add(rows, cost_s(rows) + rng.uniform(0, 0.2))
    assert busy.knee_rows() is None


def test_follows_a_change_of_cost():
    """The machine gets twice as slow per row (another tenant): ~100 steps later the fit says so."""
    fit = StepCostFit()
    for i in range(300):
        fit.add(4 + i % 20, cost_s(4 + i % 20))
    assert fit.knee_rows() == pytest.approx(15.0, rel=0.02)
    for i in range(400):
        fit.add(4 + i % 20, cost_s(4 + i % 20, per_row_s=0.002))
    assert fit.knee_rows() == pytest.approx(7.5, rel=0.05)


class Nothing(Proposer):
    method, num_tokens = "nothing", 4

    def propose(self, seq, max_tokens):
        return []


def test_the_proposer_knee_follows_the_fit_and_stays_in_bounds():
    proposer = AdaptiveProposer(Nothing(), knee_rows=32.0)
    for i in range(int(MIN_WEIGHT) + 5):
        assert i >= MIN_WEIGHT or proposer.knee_rows == 32.0  # the probe's until the fit answers
        proposer.observe_step(4 + i % 20, cost_s(4 + i % 20))
    assert proposer.knee_rows == pytest.approx(15.0, rel=0.02)
    shared = AdaptiveProposer(Nothing(), knee_rows=32.0, step_cost=proposer.step_cost)
    assert shared.knee_rows == pytest.approx(15.0, rel=0.02)  # goes on from what the other learned
    fixed = AdaptiveProposer(Nothing(), knee_rows=32.0, is_knee_fixed=True)
    for i in range(100):
        fixed.observe_step(4 + i % 20, cost_s(4 + i % 20))
    assert fixed.knee_rows == 32.0
    for fixed_s, bound in ((0.0, MIN_KNEE_ROWS), (100.0, MAX_KNEE_ROWS)):
        bounded = AdaptiveProposer(Nothing(), knee_rows=32.0)
        for i in range(100):
            bounded.observe_step(4 + i % 20, cost_s(4 + i % 20, fixed_s=fixed_s))
        assert bounded.knee_rows == bound
