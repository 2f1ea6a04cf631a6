"""The adaptive proposal-length rule: lengths follow acceptance down to zero, probes bring them back,
and a big batch gets fewer extra rows. Oracle for the rule: a brute-force search over every length
vector for the highest modelled throughput (B + expected extra tokens) / (knee + B + extra rows)."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings, strategies as st

from tgserve.core.request import GenerationRequest, SamplingParams, StoppingParams
from tgserve.core.sequence import Sequence
from tgserve.core.speculation.acceptance import Proposer
from tgserve.core.speculation.adaptive import (DEFAULT_KNEE_ROWS, MAX_PROBE_INTERVAL, MIN_PROBE_INTERVAL,
                                               UNFITTED_PROBE_KNEE_ROWS, AdaptiveProposer, choose_lengths,
                                               knee_rows_from_probe)
from tgserve.core.warmup import ProbeResult

N = 4


def sequence(request_id: int) -> Sequence:
    ids = [1, 2, 3]
    request = GenerationRequest(list(ids), SamplingParams(), StoppingParams(max_new_tokens=64))
    return Sequence(request_id, request, list(ids), len(ids), len(ids) + 64)


class FixedProposer(Proposer):
    """Proposes `limit` copies of token 7; records what it was asked and what it heard."""

    method, num_tokens = "fixed", N

    def __init__(self):
        self.asked, self.heard = [], []

    def propose_batch(self, seqs, limits):
        self.asked.append([(seq.request_id, limit) for seq, limit in zip(seqs, limits)])
        return [[7] * limit for limit in limits]

    def observe(self, seq, num_proposed, num_accepted):
        self.heard.append((seq.request_id, num_proposed, num_accepted))


def throughput(rates, lengths, knee):
    gains = sum(sum(rate ** j for j in range(1, k + 1)) for rate, k in zip(rates, lengths))
    return (len(rates) + gains) / (knee + len(rates) + sum(lengths))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 3)), min_size=1, max_size=3),
       st.floats(0.5, 64))
def test_lengths_maximize_the_modelled_throughput(seqs, knee):
    rates, limits = [r for r, _ in seqs], [limit for _, limit in seqs]
    lengths = choose_lengths(rates, limits, knee)
    assert all(0 <= k <= limit for k, limit in zip(lengths, limits))
    best = max(throughput(rates, candidate, knee)
               for candidate in itertools.product(*[range(limit + 1) for limit in limits]))
    assert throughput(rates, lengths, knee) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_high_acceptance_gets_n_zero_gets_none():
    assert choose_lengths([0.95], [N], knee_rows=16) == [N]
    assert choose_lengths([0.0], [N], knee_rows=16) == [0]
    assert choose_lengths([0.95, 0.0, 0.95], [N, N, 2], knee_rows=16) == [N, 0, 2]  # limits cut


def test_a_big_batch_gets_fewer_extra_rows_per_sequence():
    """Same acceptance, knee 16: speculation is cheap at batch 1, rationed at 16, gone at 256."""
    per_seq = {batch: sum(choose_lengths([0.6] * batch, [N] * batch, knee_rows=16)) / batch
               for batch in (1, 16, 256)}
    assert per_seq[1] >= 3 and per_seq[1] > per_seq[16] > per_seq[256] == 0
    # The rows that do go to a mixed batch go to the sequences whose guesses land.
    lengths = choose_lengths([0.9] * 4 + [0.3] * 12, [N] * 16, knee_rows=16)
    assert min(lengths[:4]) > max(lengths[4:])
    # Certain guesses are worth a row at any batch size (a whole token for less than a step).
    assert choose_lengths([1.0] * 256, [N] * 256, knee_rows=16) == [N] * 256


def step(proposer: AdaptiveProposer, seqs, num_matched) -> list[int]:
    """One engine step: propose, then observe `num_matched(request_id, k)` matched guesses; the lengths."""
    guesses = proposer.propose_batch(seqs, [N] * len(seqs))
    for seq, proposed in zip(seqs, guesses):
        if proposed:
            proposer.observe(seq, len(proposed), num_matched(seq.request_id, len(proposed)) + 1)
    return [len(proposed) for proposed in guesses]


def test_lengths_follow_acceptance_down_to_zero_then_probe_and_recover():
    inner = FixedProposer()
    proposer = AdaptiveProposer(inner, knee_rows=16)
    seq = sequence(0)
    assert step(proposer, [seq], lambda _, k: k) == [N]  # the prior proposes
    history = [step(proposer, [seq], lambda _, k: 0)[0] for _ in range(8 * MIN_PROBE_INTERVAL + 40)]  # all miss
    first_zero = history.index(0)
    assert history[first_zero:first_zero + MIN_PROBE_INTERVAL - 1] == [0] * (MIN_PROBE_INTERVAL - 1)
    probes = [i for i in range(first_zero, len(history)) if history[i]]
    assert probes and all(history[i] == 1 for i in probes)  # a probe is one guess
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0]  # missed probes back off
    assert len(inner.heard) == sum(1 for k in [N] + history if k)  # the inner proposer hears every verification
    # The text turns repetitive: the next probe hits, and the length climbs back to N.
    lengths = [step(proposer, [seq], lambda _, k: k)[0] for _ in range(MAX_PROBE_INTERVAL + 8)]
    assert lengths[-1] == N and lengths[lengths.index(1) + 1:].count(0) == 0


def test_a_missed_probe_waits_at_most_max_interval():
    proposer = AdaptiveProposer(FixedProposer(), knee_rows=16)
    seq = sequence(0)
    history = [step(proposer, [seq], lambda _, k: 0)[0] for _ in range(12 * MAX_PROBE_INTERVAL)]
    probes = [i for i, k in enumerate(history) if k]
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert max(gaps) == MAX_PROBE_INTERVAL and gaps[-3:] == [MAX_PROBE_INTERVAL] * 3


def test_big_batch_gets_fewer_rows_through_the_proposer():
    """Sequences that accept 1 guess in 2: at batch 1 they speculate, at batch 64 they barely do."""

    def half(_, k):
        return min(k, 1) if k > 1 else 0

    rows = {}
    for batch in (1, 64):
        proposer = AdaptiveProposer(FixedProposer(), knee_rows=16)
        seqs = [sequence(i) for i in range(batch)]
        rows[batch] = [sum(step(proposer, seqs, half)) / batch for _ in range(30)][-10:]
    assert min(rows[1]) >= 1 and max(rows[64]) < min(rows[1]) / 2


def test_inner_proposer_sees_only_sequences_given_guesses_and_states_leave_with_them():
    inner = FixedProposer()
    proposer = AdaptiveProposer(inner, knee_rows=2)  # rows cost: a guess needs a rate > 0.5 at batch 2
    good, bad = sequence(0), sequence(1)
    for _ in range(10):
        step(proposer, [good, bad], lambda request_id, k: k if request_id == 0 else 0)
    late = [dict(asked) for asked in inner.asked[5:]]
    assert all(asked[0] == N for asked in late)
    assert any(1 not in asked for asked in late)  # the missing one is at 0: not asked about at all,
    assert all(asked.get(1, 1) == 1 for asked in late)  # or probed with one guess
    step(proposer, [good], lambda _, k: k)  # `bad` finished
    assert set(proposer._states) == {0}
    # The engine's room limit wins over the chosen length.
    assert proposer.propose_batch([good], [2]) == [[7, 7]]


def test_knee_from_the_probe_fit():
    # 64 tokens in 40 ms, 256 in 100 ms: 0.3125 ms per token, 20 ms fixed: knee 64 rows.
    probe = ProbeResult(num_tokens=256, step_s=0.100, elapsed_s=0.2, short_tokens=64, short_step_s=0.040)
    assert knee_rows_from_probe(probe) == pytest.approx(64.0)
    assert knee_rows_from_probe(None) == DEFAULT_KNEE_ROWS  # TGI's full warmup step: nothing timed
    one_step = ProbeResult(num_tokens=64, step_s=0.8, elapsed_s=1.6)  # too slow for the long step
    assert knee_rows_from_probe(one_step) == UNFITTED_PROBE_KNEE_ROWS < DEFAULT_KNEE_ROWS
    not_slower = ProbeResult(num_tokens=256, step_s=0.03, elapsed_s=0.2, short_tokens=64, short_step_s=0.040)
    assert knee_rows_from_probe(not_slower) == UNFITTED_PROBE_KNEE_ROWS
    all_per_token = ProbeResult(num_tokens=256, step_s=0.256, elapsed_s=0.2, short_tokens=64, short_step_s=0.064)
    assert knee_rows_from_probe(all_per_token) == 1.0  # clamped: a zero fixed cost still leaves one row


def test_max_tokens_caps_below_the_inner_proposer():
    proposer = AdaptiveProposer(FixedProposer(), knee_rows=16, max_tokens=2)
    assert proposer.num_tokens == 2 and proposer.propose_batch([sequence(0)], [N]) == [[7, 7]]


def test_a_new_sequence_starts_from_the_servers_recent_acceptance():
    """After requests whose guesses all missed, a new request proposes nothing at first (it waits for its
    probe); after requests whose guesses all matched, a new one proposes N at once."""
    for accepts, expected in ((lambda _, k: 0, 0), (lambda _, k: k, N)):
        proposer = AdaptiveProposer(FixedProposer(), knee_rows=16)
        for request_id in range(40):  # one after another, each verified a few times
            seq = sequence(request_id)
            for _ in range(4):
                step(proposer, [seq], accepts)
        assert step(proposer, [sequence(99)], accepts) == [expected]
    fresh = AdaptiveProposer(FixedProposer(), knee_rows=16)
    assert step(fresh, [sequence(0)], lambda _, k: 0) == [N]  # before any verification: the optimistic prior


def test_one_lucky_guess_among_misses_is_not_a_trend():
    """On a server whose guesses miss, 16 new sequences; the first probe of one of them matches. One
    match is not evidence enough at batch 16 (its rate is shrunk towards the server's), but matches
    every time it is verified bring it back to guessing."""
    proposer = AdaptiveProposer(FixedProposer(), knee_rows=16)
    for _ in range(30):
        step(proposer, [sequence(100 + i) for i in range(16)], lambda _, k: 0)
    seqs = [sequence(i) for i in range(16)]

    def lucky(request_id, k):
        return k if request_id == 0 else 0

    history = [step(proposer, seqs, lucky)[0] for _ in range(4 * MIN_PROBE_INTERVAL)]
    first = history.index(1)
    assert history[first + 1] == 0  # the probe matched, and still no guess the step after
    later = [step(proposer, seqs, lucky)[0] for _ in range(8 * MIN_PROBE_INTERVAL)]
    assert later[-MIN_PROBE_INTERVAL:].count(0) == 0  # matching every probe: guessing every step
