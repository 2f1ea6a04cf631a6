"""`--speculate N` in the engine on the demo model: n-gram proposals verified inside continuous batching.

Oracle: the same engine with speculation off (proposer None), the `--speculate 0` output: greedy and
seeded sampled ids equal token for token, logprobs and top tokens equal within float32 noise (a
verified position runs as a multi-row query, a plain decode as a one-row one). The prompts repeat
their own text, so n-gram guesses are accepted and every test checks that they were (steps that gave
a request more than one token). transformers' agreement with the engine's multi-token steps is
checked in tests/core/test_multi_token_steps.py.
"""
from __future__ import annotations

import contextlib
import threading
import time

import pytest

from tgserve.checkpoints.demo_tokenizer import render_chat
from tgserve.core.request import GenerationRequest, SamplingParams, StoppingParams
from tgserve.core.speculation.acceptance import Proposer
from tgserve.core.speculation.adaptive import AdaptiveProposer
from tgserve.core.speculation.ngram import NgramProposer

from ..engine_harness import Collected, run_all, running_engine

MAX_BATCH_PREFILL_TOKENS = 64
MAX_TOTAL_TOKENS = 512
NEW_TOKENS = 40
LOGPROB_TOLERANCE = 1e-4
PROMPTS = [
    "The river ran past the mill. The river ran past the mill. The river ran",
    "The cat sat on the mat and the dog sat on the rug.",
    "The baker is already asleep. The bread for the morning is in the oven. The baker is",
]
# Longer than a step's token budget: its prefill runs in chunks beside the others' verifications.
LONG_PROMPT = " ".join(["In early spring the garden is still brown and bare."] * 12)


@pytest.fixture(scope="module")
def engine(demo_model_dir):
    with running_engine(demo_model_dir, dtype="float32", max_batch_prefill_tokens=MAX_BATCH_PREFILL_TOKENS,
                        max_batch_total_tokens=8192, max_total_tokens=MAX_TOTAL_TOKENS, speculate=4) as engine:
        yield engine


@pytest.fixture(scope="module")
def prompts(engine):
    return [engine.tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def long_prompt(engine):
    ids = engine.tokenizer.encode(LONG_PROMPT)
    assert len(ids) > 2 * MAX_BATCH_PREFILL_TOKENS
    return ids


@contextlib.contextmanager
def speculating(engine, proposer):
    """Run with `proposer` (None: --speculate 0); the engine's own proposer is restored after."""
    default = engine.proposer
    engine.proposer = proposer
    try:
        yield proposer
    finally:
        engine.proposer = default


def request(ids, max_new_tokens=NEW_TOKENS, stop=(), top_n_tokens=0, **sampling) -> GenerationRequest:
    return GenerationRequest(list(ids), SamplingParams(**sampling),
                             StoppingParams(max_new_tokens=max_new_tokens, stop_sequences=tuple(stop),
                                            ignore_eos_token=True), top_n_tokens=top_n_tokens)


def run(engine, speculate: int, requests) -> list[Collected]:
    with speculating(engine, NgramProposer(speculate) if speculate else None):
        return run_all(engine, requests)


def num_skipped(got: Collected) -> int:
    """Tokens the request gained by speculation: for each step, its tokens less one (TGI's metric)."""
    return sum(e.num_step_tokens - 1 for e in got.events if e.num_step_tokens)


def step_runs(got: Collected) -> list[range]:
    """Event indexes (0-based) grouped by the step that produced them."""
    runs, start = [], 0
    for i, event in enumerate(got.events):
        if event.num_step_tokens:
            assert event.num_step_tokens == i + 1 - start
            runs.append(range(start, i + 1))
            start = i + 1
    assert start == len(got.events)
    return runs


def assert_same_tokens(got: Collected, ref: Collected) -> None:
    """Ids, indexes, logprobs and top tokens of each event equal the non-speculative run's."""
    assert got.ids == ref.ids
    assert [e.index for e in got.events] == [e.index for e in ref.events]
    for event, expected in zip(got.events, ref.events):
        assert event.logprob == pytest.approx(expected.logprob, abs=LOGPROB_TOLERANCE)
        assert [t.id for t in event.top_tokens] == [t.id for t in expected.top_tokens]
        assert [t.logprob for t in event.top_tokens] == pytest.approx(
            [t.logprob for t in expected.top_tokens], abs=LOGPROB_TOLERANCE)
    assert got.finish.reason == ref.finish.reason and got.finish.text == ref.finish.text


def assert_no_blocks_held(engine, timeout_s: float = 30) -> None:
    """Bounded poll: the engine drops finished and cancelled requests before its next step."""
    deadline = time.monotonic() + timeout_s
    while (engine.num_in_flight or engine.num_used_kv_blocks) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.num_in_flight == 0 and engine.num_used_kv_blocks == 0
    assert not engine.scheduler.running and not engine.scheduler.waiting


@pytest.fixture(scope="module")
def greedy_reference(engine, prompts):
    """--speculate 0, each prompt alone, with top tokens."""
    return [run(engine, 0, [request(ids, top_n_tokens=2)])[0] for ids in prompts]


def test_the_flag_builds_an_adaptive_ngram_proposer(engine):
    assert isinstance(engine.proposer, AdaptiveProposer) and engine.proposer.num_tokens == 4
    assert isinstance(engine.proposer.inner, NgramProposer) and engine.proposer.inner.num_tokens == 4
    assert engine.proposer.knee_rows > 0
    assert engine.config.speculate == 4


@pytest.mark.parametrize("speculate", [1, 2, 4])
def test_greedy_alone_equals_speculate_0(engine, prompts, greedy_reference, speculate):
    got = [run(engine, speculate, [request(ids, top_n_tokens=2)])[0] for ids in prompts]
    for result, ref in zip(got, greedy_reference):
        assert_same_tokens(result, ref)
        assert all(len(r) <= speculate + 1 for r in step_runs(result))
    assert sum(num_skipped(result) for result in got) > 0, "no n-gram guess was ever accepted"
    assert_no_blocks_held(engine)


class PlanRecorder:
    """Wraps `scheduler.schedule`: (num_new_tokens, num_sampled) of every item of every plan."""

    def __init__(self, scheduler):
        self.scheduler, self.schedule, self.plans = scheduler, scheduler.schedule, []

    def __enter__(self):
        def schedule():
            plan = self.schedule()
            self.plans.append([(item.num_new_tokens, item.num_sampled) for item in plan.scheduled])
            return plan
        self.scheduler.schedule = schedule
        return self

    def __exit__(self, *exc):
        del self.scheduler.schedule  # back to the class's method


@pytest.mark.parametrize("speculate", [0, 1, 2, 4])
def test_greedy_concurrent_with_prefill_chunks_equals_speculate_0(engine, prompts, long_prompt, greedy_reference,
                                                                    speculate):
    """All prompts at once, the long one prefilling in chunks while the others verify guesses."""
    (long_ref,) = run(engine, 0, [request(long_prompt, top_n_tokens=2)])
    engine.scheduler.blocks.clear_cache()  # the long prompt prefills in chunks again, not from the cache
    with PlanRecorder(engine.scheduler) as recorder:
        *got, long_got = run(engine, speculate, [request(ids, top_n_tokens=2) for ids in prompts]
                             + [request(long_prompt, top_n_tokens=2)])
    for result, ref in zip(got + [long_got], greedy_reference + [long_ref]):
        assert_same_tokens(result, ref)
    if speculate:
        assert sum(num_skipped(result) for result in got) > 0
        # One forward held a mid-prompt chunk (nothing sampled) and a verification (k + 1 sampled).
        assert any(any(s == 0 for _, s in plan) and any(s > 1 for _, s in plan) for plan in recorder.plans)
    assert_no_blocks_held(engine)


def extra_rows(recorder: PlanRecorder) -> int:
    """Verification rows beyond one per sampling sequence, over every recorded plan."""
    return sum(max(0, sampled - 1) for plan in recorder.plans for _, sampled in plan)


def test_adaptive_lengths_keep_greedy_output_and_ration_rows(engine, prompts, long_prompt, greedy_reference):
    """The proposer `--speculate` builds (adaptive lengths) with a cheap and a dear row cost: the same
    ids as --speculate 0 with prefill chunks beside; the dear one (knee 1 row: every extra row costs
    as much as the step) verifies fewer extra rows."""
    (long_ref,) = run(engine, 0, [request(long_prompt, top_n_tokens=2)])
    rows = {}
    for knee_rows in (64.0, 1.0):
        engine.scheduler.blocks.clear_cache()  # both runs prefill the long prompt in chunks
        with speculating(engine, AdaptiveProposer(NgramProposer(4), knee_rows=knee_rows, is_knee_fixed=True)):
            with PlanRecorder(engine.scheduler) as recorder:
                *got, long_got = run_all(engine, [request(ids, top_n_tokens=2) for ids in prompts]
                                         + [request(long_prompt, top_n_tokens=2)])
        for result, ref in zip(got + [long_got], greedy_reference + [long_ref]):
            assert_same_tokens(result, ref)
        rows[knee_rows] = extra_rows(recorder)
        if knee_rows == 64.0:
            assert sum(num_skipped(result) for result in got) > 0
    assert rows[1.0] < rows[64.0]
    assert_no_blocks_held(engine)


def test_the_proposer_hears_every_decoding_step_and_its_rows(engine, prompts, long_prompt):
    """`observe_step` once per step that computed no prompt token, with that step's rows; the adaptive
    proposer's knee then follows the fit of those steps (tests/core/speculation/test_step_cost.py)."""
    heard, decoding_rows = [], []

    class Hearing(NgramProposer):
        def observe_step(self, num_rows, step_s):
            assert step_s > 0
            heard.append(num_rows)

    schedule = engine.scheduler.schedule

    def recording_schedule():
        plan = schedule()
        if plan and all(item.seq.num_computed_tokens >= item.seq.num_prompt_tokens for item in plan.scheduled):
            decoding_rows.append(plan.num_tokens)
        return plan

    engine.scheduler.schedule = recording_schedule
    try:
        with speculating(engine, Hearing(4)):
            got = run_all(engine, [request(ids) for ids in prompts] + [request(long_prompt)])
    finally:
        del engine.scheduler.schedule
    assert sum(num_skipped(result) for result in got) > 0  # verification rows were among them
    assert heard == decoding_rows and max(heard) > len(prompts) + 1
    assert_no_blocks_held(engine)


def test_seeded_sampling_equals_speculate_0(engine, prompts):
    """Each verified position draws with its own generated-token index: the same text as plain sampling."""
    sampling = [dict(do_sample=True, temperature=0.5, seed=7 + i) for i in range(len(prompts))]
    sampling[1].update(top_k=5, top_p=0.9)
    plain = run(engine, 0, [request(ids, top_n_tokens=1, **s) for ids, s in zip(prompts, sampling)])
    spec = run(engine, 4, [request(ids, top_n_tokens=1, **s) for ids, s in zip(prompts, sampling)])
    for result, ref in zip(spec, plain):
        assert_same_tokens(result, ref)
        assert result.finish.seed == ref.finish.seed
    assert sum(num_skipped(result) for result in spec) > 0
    assert_no_blocks_held(engine)


def test_stop_sequence_cuts_inside_an_accepted_run(engine, prompts, greedy_reference):
    """The stop ends at a token in the middle of a step that accepted several guesses: the request
    ends at that token, the step's later tokens are not emitted, and its last event counts only the
    emitted ones. An accepted n-gram run repeats earlier text, so the stop is the shortest end of the
    text up to that token that is new there. Reference: the first prefix of the plain output whose
    text holds the stop (a brute-force search)."""
    decode = engine.tokenizer.decode
    (spec,) = run(engine, 4, [request(prompts[0])])
    ref = greedy_reference[0].ids
    assert spec.ids == ref
    run_ = next(r for r in step_runs(spec) if len(r) >= 3)
    middle = run_.start + 1
    text, before = decode(ref[:middle + 1]), decode(ref[:middle])
    assert len(text) > len(before), "the middle token adds no text: pick another prompt"
    stop = next(text[-n:] for n in range(1, len(text) + 1) if text[-n:] not in before)
    cut = next(i for i in range(len(ref)) if stop in decode(ref[:i + 1]))
    assert cut == middle
    (got,) = run(engine, 4, [request(prompts[0], stop=[stop])])
    assert got.ids == ref[:cut + 1]
    assert got.finish.reason == "stop_sequence" and got.finish.generated_tokens == cut + 1
    assert got.events[-1].num_step_tokens == cut - run_.start + 1 < len(run_)
    assert_no_blocks_held(engine)


class RecordingProposer(Proposer):
    """Wraps a proposer; checks and records what the engine allows it at every call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def propose(self, seq, max_tokens):
        # Verified positions stay inside the slots reserved at admission, and no guess is made
        # for a token past max_new_tokens.
        assert len(seq.token_ids) + max_tokens <= seq.max_tokens - 1
        proposed = self.inner.propose(seq, max_tokens)
        self.calls.append((seq.max_tokens - len(seq.token_ids), max_tokens, len(proposed)))
        return proposed


class OracleProposer(Proposer):
    """Proposes up to `num_tokens` of the known continuation: every guess is right, so proposals run
    to the edge."""

    def __init__(self, continuation, num_tokens):
        self.continuation, self.num_tokens = continuation, num_tokens

    def propose(self, seq, max_tokens):
        done = seq.num_generated_tokens
        return self.continuation[done:done + min(max_tokens, self.num_tokens)]


def test_proposals_shrink_at_the_edge_of_max_total_tokens(engine, long_prompt):
    """A request of exactly max_total_tokens whose guesses are always right: the last steps propose
    fewer than N (their room), and it ends at max_new_tokens with the plain output and no block left."""
    prompt = (long_prompt * 4)[:MAX_TOTAL_TOKENS - 23]
    max_new = MAX_TOTAL_TOKENS - len(prompt)
    (ref,) = run(engine, 0, [request(prompt, max_new_tokens=max_new)])
    assert ref.finish.generated_tokens == max_new
    proposer = RecordingProposer(OracleProposer(ref.ids, 4))
    with speculating(engine, proposer):
        (got,) = run_all(engine, [request(prompt, max_new_tokens=max_new)])
    assert_same_tokens(got, ref)
    assert [n for _, _, n in proposer.calls[:2]] == [4, 4]
    room, allowed, proposed = proposer.calls[-1]
    assert allowed == proposed == room - 1 < 4  # the last guess fills the request exactly
    assert len(step_runs(got)[-1]) == room
    # With an n-gram proposer near the edge too.
    proposer = RecordingProposer(NgramProposer(4))
    with speculating(engine, proposer):
        (got,) = run_all(engine, [request(prompt, max_new_tokens=max_new)])
    assert_same_tokens(got, ref)
    assert sum(n for _, _, n in proposer.calls) > 0
    assert_no_blocks_held(engine)


def test_eos_cuts_inside_an_accepted_run(engine):
    """A chat answer ends in <|im_end|>; guesses that run past it (the continuation generated with
    ignore_eos) are accepted up to it, and the request ends there as without speculation."""
    prompt = engine.tokenizer.encode(render_chat([{"role": "user", "content": "What does the baker do?"}],
                                                 add_generation_prompt=True))

    def chat_request(ignore_eos):
        return GenerationRequest(list(prompt), SamplingParams(),
                                 StoppingParams(max_new_tokens=NEW_TOKENS, ignore_eos_token=ignore_eos))

    (ref,) = run(engine, 0, [chat_request(False)])
    assert ref.finish.reason == "eos_token", "the demo model did not end its answer: pick another question"
    (past_eos,) = run(engine, 0, [chat_request(True)])
    assert past_eos.ids[:len(ref.ids)] == ref.ids and len(past_eos.ids) > len(ref.ids)
    proposer = RecordingProposer(OracleProposer(past_eos.ids, 4))
    with speculating(engine, proposer):
        (got,) = run_all(engine, [chat_request(False)])
    assert_same_tokens(got, ref)
    last_step_tokens = got.events[-1].num_step_tokens
    allowed_last = proposer.calls[-1][2] + 1  # the last step verified this many rows
    assert last_step_tokens < allowed_last  # the eos came before the step's last accepted token
    assert_no_blocks_held(engine)


def test_blocks_return_after_finished_stopped_and_cancelled_requests(engine, prompts, greedy_reference):
    """Speculating requests that run to max_new_tokens, stop on a stop sequence, or are cancelled
    right after a multi-token step, all at once: every KV block is back afterwards."""
    decode = engine.tokenizer.decode
    stop = decode(greedy_reference[2].ids[:6])[len(decode(greedy_reference[2].ids[:5])):]
    cancelled = threading.Event()
    seen_multi = []

    class CancelAfterMultiStep(Collected):
        def __call__(self, event):
            super().__call__(event)
            if event.num_step_tokens > 1 and not cancelled.is_set():
                seen_multi.append(event.index)
                engine.cancel(self.request_id)
                cancelled.set()

    with speculating(engine, NgramProposer(4)):
        finished, stopped = Collected(), Collected()
        engine.submit(request(prompts[0]), finished)
        engine.submit(request(prompts[2], stop=[stop]), stopped)
        cancelling = CancelAfterMultiStep()
        cancelling.request_id = engine.submit(request(prompts[0], max_new_tokens=200), cancelling)
        for sink in (finished, stopped):
            assert sink.done.wait(120)
        assert cancelled.wait(120), "the cancelled request never had a multi-token step"
        assert_no_blocks_held(engine)
    assert finished.finish.reason == "length" and stopped.finish.reason == "stop_sequence"
    assert not cancelling.done.is_set() and seen_multi


SMOLLM2_PROMPT = ("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
                  "Rewrite both functions with type hints:\n\ndef add(a: int, b: int) -> int:\n")


def test_smollm2_greedy_equals_speculate_0(smollm2_dir):
    """The real model on input-grounded code (it copies the functions from the prompt): speculate 2 and
    4, alone and beside a plain request, give --speculate 0's ids, and guesses are accepted."""
    with running_engine(smollm2_dir, dtype="float32", max_batch_prefill_tokens=256, max_batch_total_tokens=4096,
                        max_total_tokens=1024) as engine:
        prompt = engine.tokenizer.encode(SMOLLM2_PROMPT)
        other = engine.tokenizer.encode("The capital of France is")
        ref, other_ref = run(engine, 0, [request(prompt, max_new_tokens=32), request(other, max_new_tokens=16)])
        for speculate in (2, 4):
            got, other_got = run(engine, speculate, [request(prompt, max_new_tokens=32),
                                                     request(other, max_new_tokens=16)])
            assert_same_tokens(got, ref)
            assert_same_tokens(other_got, other_ref)
            assert num_skipped(got) > 0
        assert_no_blocks_held(engine)
