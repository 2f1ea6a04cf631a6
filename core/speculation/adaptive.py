"""Adaptive proposal lengths: how many guesses each decoding sequence gets verified in a step.

Gain. A sequence's guesses are accepted one after another, each with probability `a` (its acceptance
rate), up to the first miss; verifying k guesses yields on average E(k) = 1 + a + ... + a^k =
(1 - a^(k+1)) / (1 - a) tokens, so guess j adds a^j. `a` is estimated per sequence from its recent
verifications: exponentially decayed counts of accepted guesses over guesses tried up to and
including the first miss (the geometric model's estimate), shrunk towards the rate of the server's
recent verifications (all sequences, decayed slower: `POOL_DECAY`; `PRIOR_RATE` before any) by
`PRIOR_WEIGHT` pseudo-guesses. A new sequence so starts where the server's requests are: on a server
answering open-ended chat it starts with no guesses (a probe after 8 steps) instead of paying for a few
doomed guesses first (~3% of a 16-request batch's rows here); one serving code edits starts ready to
guess. The shrinkage is for the sequences the rule picks: picking the highest of many noisy rates
picks the lucky ones (measured on open-ended chat, 16 concurrent, SmolLM2: sequences picked at an
unshrunk rate of 0.5-0.9 then accepted their first guess 0.45 of the time).

Cost, and the step's budget of extra rows. A step costs about T0 + t * rows: T0 streams the weights
once (memory-bound, the same for 1 row or 20), t is one row's compute. `knee_rows` = T0 / t, the rows
at which a step costs twice a one-row step. A step of B decoding rows, with R extra rows already
given for G expected extra tokens, gains throughput (B + G) / (T0 + t (B + R)) from one more row of
gain g iff g > (B + G) / (knee_rows + B + R). The rule gives guesses in order of gain, best first,
while that holds; the threshold only grows as rows are added. At batch 1 every guess with
a^j > ~1 / knee_rows is taken (extra rows are nearly free); at a batch well past the knee
(compute-bound) only guesses that are close to certain are (verification rows are no longer free).
The engine starts `knee_rows` at its start-up probe's (`knee_rows_from_probe`: the probe's fitted fixed
cost over its per-token cost; see `DEFAULT_KNEE_ROWS` and `UNFITTED_PROBE_KNEE_ROWS` for the rest),
then follows the decoding steps it runs (`tgserve.core.speculation.step_cost`: a decoding row costs
more than the probe's prefill token).

Zero and probes. A sequence whose guesses are not worth a row gets k = 0: nothing is proposed for it.
After `probe_interval` steps at 0 it is given one guess anyway (a probe), so text that turns
repetitive gets proposals again. A probe that misses doubles that sequence's interval (up to
`MAX_PROBE_INTERVAL`), an accepted guess resets it: text that never repeats costs a probe row after
8, 24, 56, 120 steps, then one every 128: 3 extra rows (under 5%) in a 64-token answer, which costs
under 5% of the time even where rows are not free.

`AdaptiveProposer` wraps any `Proposer` (n-gram, Medusa, draft) with this rule: the engine sees a
proposer, the inner one sees fewer sequences or lower limits. Greedy and seeded outputs are the same
for any lengths (each verified position is the token plain decoding would sample there).
"""
from __future__ import annotations

from dataclasses import dataclass

from tgserve.core.sequence import Sequence
from tgserve.core.speculation.acceptance import Proposer
from tgserve.core.speculation.step_cost import StepCostFit

PRIOR_RATE = 0.7  # the first sequences' acceptance rate: optimistic, so they propose and are measured
PRIOR_WEIGHT = 2.0  # the server's recent rate counts as this many tried guesses in every sequence's rate
DECAY = 0.75  # each verification keeps this share of the older counts (memory of ~4 verifications)
POOL_DECAY = 0.97  # the server-wide counts: each verification keeps this share (memory of ~30)
MIN_PROBE_INTERVAL = 8  # steps at k = 0 before the first probe
MAX_PROBE_INTERVAL = 128  # the longest wait between probes of a sequence whose probes keep missing
# Without a probe (a backend that warms up with TGI's full step, e.g. a GPU): a 7B model in bf16 on a
# data-centre GPU streams its weights in ~5 ms and computes a row in ~0.02-0.05 ms (knee 100-250); a
# small model on a CPU has knees of ~5-30. 64 is between, and only decides how big a batch still speculates.
DEFAULT_KNEE_ROWS = 64.0
# A probe with no usable fit timed one step only, because that step was slow (a 64-token prefill of
# 0.75 s or more: a slow CPU path or a big model) or noisy: per-row compute dominates there, and CPUs
# have knees of about 2 x FLOP/s over bytes/s of f32 weights (~5-10; bf16 with AMX more).
UNFITTED_PROBE_KNEE_ROWS = 8.0
MIN_KNEE_ROWS, MAX_KNEE_ROWS = 1.0, 1024.0


def choose_lengths(rates: list[float], limits: list[int], knee_rows: float) -> list[int]:
    """Guesses for each of len(rates) decoding sequences (the rows of the step besides the guesses):
    rates[i] is sequence i's acceptance rate, limits[i] >= 0 the most it may verify. Takes guesses
    best-gain first (guess j of sequence i gains rates[i] ** j tokens) while a guess's gain exceeds the
    step's tokens per row-cost, (B + G) / (knee_rows + B + R); see the module docstring."""
    num_seqs = len(rates)
    floor = num_seqs / (knee_rows + num_seqs)  # the threshold before any guess; it only grows
    candidates: list[tuple[float, int]] = []
    for i, (rate, limit) in enumerate(zip(rates, limits)):
        gain = rate
        for _ in range(limit):
            if gain <= floor:
                break
            candidates.append((gain, i))
            gain *= rate
    candidates.sort(key=lambda candidate: -candidate[0])  # stable: ties keep sequence order
    lengths = [0] * num_seqs
    tokens, rows = float(num_seqs), 0
    for gain, i in candidates:
        if gain <= tokens / (knee_rows + num_seqs + rows):
            break
        lengths[i] += 1
        tokens += gain
        rows += 1
    return lengths


def knee_rows_from_probe(probe) -> float:
    """T0 / t from the start-up probe (`tgserve.core.warmup.ProbeResult`): the fitted fixed cost of a
    step over its per-token cost, clamped to [MIN_KNEE_ROWS, MAX_KNEE_ROWS]. DEFAULT_KNEE_ROWS
    without a probe (TGI's full warmup step); UNFITTED_PROBE_KNEE_ROWS without a usable fit (one
    timed step, or a longer step that was not slower)."""
    if probe is None:
        return DEFAULT_KNEE_ROWS
    if not probe.short_tokens or probe.num_tokens <= probe.short_tokens:
        return UNFITTED_PROBE_KNEE_ROWS
    per_token_s = (probe.step_s - probe.short_step_s) / (probe.num_tokens - probe.short_tokens)
    if per_token_s <= 0:
        return UNFITTED_PROBE_KNEE_ROWS
    fixed_s = probe.short_step_s - probe.short_tokens * per_token_s
    return min(MAX_KNEE_ROWS, max(MIN_KNEE_ROWS, fixed_s / per_token_s))


@dataclass(slots=True)
class AdaptiveState:
    """One sequence's recent acceptance, host side, kept by `AdaptiveProposer` on the engine thread."""

    num_accepted: float = 0.0  # decayed count of accepted guesses
    num_tried: float = 0.0  # decayed count of guesses up to and including each first miss
    num_idle_steps: int = 0  # consecutive steps given k = 0
    probe_interval: int = MIN_PROBE_INTERVAL  # idle steps before the next probe
    is_probing: bool = False  # the last proposal was a probe, not yet observed

    def rate(self, prior_rate: float) -> float:
        """The acceptance rate estimate: these counts plus `prior_rate` as PRIOR_WEIGHT tried guesses."""
        return (self.num_accepted + PRIOR_WEIGHT * prior_rate) / (self.num_tried + PRIOR_WEIGHT)

    def count(self, num_proposed: int, num_matched: int, decay: float) -> None:
        """Decay the counts, then add one verification: `num_matched` of `num_proposed` guesses matched
        (a miss, when there is one, counts as a tried guess)."""
        self.num_accepted = decay * self.num_accepted + num_matched
        self.num_tried = decay * self.num_tried + num_matched + (num_matched < num_proposed)


class AdaptiveProposer(Proposer):
    """`inner`'s guesses, at the lengths `choose_lengths` gives each step (`tgserve.core.speculation.Proposer`).

    knee_rows: T0 / t of this model on this backend until the decoding steps place a fit
    (`knee_rows_from_probe`); max_tokens: a lower cap than the inner proposer's own (`tgserve benchmark
    speculation` runs --speculate 2 over a proposer built for 4); step_cost: the fit of decoding steps
    to follow (another proposer's, to go on from what it learned; a new one by default);
    is_knee_fixed: keep `knee_rows` as given (the benchmark's --knee-rows). The per-sequence states live here keyed by request id (the inner proposer owns
    `seq.proposer_state`); each step keeps only those of the sequences it is asked about, so finished
    requests leave nothing behind."""

    def __init__(self, inner: Proposer, knee_rows: float = DEFAULT_KNEE_ROWS, max_tokens: int | None = None,
                 step_cost: StepCostFit | None = None, is_knee_fixed: bool = False):
        if knee_rows <= 0:
            raise ValueError(f"knee_rows must be > 0, got {knee_rows}")
        self.inner = inner
        self.knee_rows = knee_rows
        self.step_cost = None if is_knee_fixed else step_cost or StepCostFit()
        self._follow_step_cost()
        self.method = inner.method
        self.num_tokens = inner.num_tokens if max_tokens is None else min(max_tokens, inner.num_tokens or max_tokens)
        self._states: dict[int, AdaptiveState] = {}
        self._pool = AdaptiveState()  # every sequence's verifications, decayed by POOL_DECAY: the shared prior

    def propose(self, seq: Sequence, max_tokens: int) -> list[int]:
        """One sequence at its adaptive length (the engine calls `propose_batch`)."""
        return self.propose_batch([seq], [max_tokens])[0]

    def propose_batch(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        """The inner proposer's guesses for the sequences whose chosen length is >= 1, cut to it."""
        states = {seq.request_id: self._states.get(seq.request_id) or AdaptiveState() for seq in seqs}
        self._states = states
        limits = [min(limit, self.num_tokens) if self.num_tokens else limit for limit in limits]
        prior_rate = self._pool.rate(PRIOR_RATE)
        lengths = choose_lengths([states[seq.request_id].rate(prior_rate) for seq in seqs], limits, self.knee_rows)
        for i, (seq, limit) in enumerate(zip(seqs, limits)):
            state = states[seq.request_id]
            if lengths[i] or limit <= 0:
                state.num_idle_steps = 0
                continue
            state.num_idle_steps += 1
            if state.num_idle_steps >= state.probe_interval:
                lengths[i], state.num_idle_steps, state.is_probing = 1, 0, True
        chosen = [i for i, length in enumerate(lengths) if length]
        result: list[list[int]] = [[] for _ in seqs]
        if chosen:
            guesses = self.inner.propose_batch([seqs[i] for i in chosen], [lengths[i] for i in chosen])
            for i, proposed in zip(chosen, guesses):
                result[i] = proposed[:lengths[i]]
        return result

    def observe(self, seq: Sequence, num_proposed: int, num_accepted: int) -> None:
        """Update `seq`'s rate (num_accepted - 1 guesses matched; a miss counts as a tried guess) and
        its probe interval, then tell the inner proposer."""
        state = self._states.setdefault(seq.request_id, AdaptiveState())
        num_matched = num_accepted - 1
        state.count(num_proposed, num_matched, DECAY)
        self._pool.count(num_proposed, num_matched, POOL_DECAY)
        if num_matched:
            state.probe_interval = MIN_PROBE_INTERVAL
        elif state.is_probing:
            state.probe_interval = min(MAX_PROBE_INTERVAL, 2 * state.probe_interval)
        state.is_probing = False
        self.inner.observe(seq, num_proposed, num_accepted)

    def observe_step(self, num_rows: int, step_s: float) -> None:
        """A decoding step's rows and seconds: `knee_rows` follows their fit once it has one."""
        if self.step_cost is not None:
            self.step_cost.add(num_rows, step_s)
            self._follow_step_cost()

    def _follow_step_cost(self) -> None:
        knee_rows = self.step_cost.knee_rows() if self.step_cost is not None else None
        if knee_rows is not None:
            self.knee_rows = min(MAX_KNEE_ROWS, max(MIN_KNEE_ROWS, knee_rows))

    def take_guesses(self, seq: Sequence, guesses: list[int]) -> None:
        """The runner's own guesses (Medusa heads) go to the inner proposer."""
        self.inner.take_guesses(seq, guesses)
