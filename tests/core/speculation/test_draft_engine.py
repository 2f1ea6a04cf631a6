"""`--speculative-model` in the engine on the demo model: a draft's greedy guesses verified inside
continuous batching.

Drafts: the demo model's first layer alone (`write_truncated_draft`: its guesses are often, not always,
the target's, so steps both accept and reject), and the demo model as its own draft (every guess is
the target's own greedy token, so every verification accepts all of them: a draft whose K/V went
stale after a rollback would guess wrong and show as a short step). Oracle: the same engine with
speculation off (`--speculate 0`): greedy and seeded sampled ids equal token for token, logprobs and
top tokens within float32 noise.
"""
from __future__ import annotations

import json
import threading

import pytest

from tgserve.core.config import ConfigError, ServerConfig
from tgserve.core.engine_builder import build_engine
from tgserve.core.plugins import BackendRegistry
from tgserve.core.sequence import Sequence
from tgserve.core.speculation.adaptive import AdaptiveProposer
from tgserve.core.speculation.draft import DraftProposer, DraftState
from tgserve.core.speculation.draft_checkpoint import DraftVocabularyMismatch

from ..engine_harness import Collected, run_all, running_engine
from .draft_checkpoints import write_relabelled_tokenizer, write_truncated_draft
from .test_speculative_engine import (LONG_PROMPT, MAX_BATCH_PREFILL_TOKENS, MAX_TOTAL_TOKENS, PROMPTS,
                                      SMOLLM2_PROMPT, PlanRecorder, assert_no_blocks_held, assert_same_tokens,
                                      num_skipped, request, speculating, step_runs)

ENGINE_FLAGS = dict(dtype="float32", max_batch_prefill_tokens=MAX_BATCH_PREFILL_TOKENS, max_batch_total_tokens=8192,
                    max_total_tokens=MAX_TOTAL_TOKENS)


@pytest.fixture(scope="module")
def draft_dir(demo_model_dir, tmp_path_factory):
    return write_truncated_draft(demo_model_dir, tmp_path_factory.mktemp("draft") / "one-layer", num_layers=1)


@pytest.fixture(scope="module")
def engine(demo_model_dir, draft_dir):
    """The demo model with the one-layer draft, --speculate left to its default with a draft."""
    with running_engine(demo_model_dir, speculative_model=str(draft_dir), **ENGINE_FLAGS) as engine:
        # --speculate serves adaptive lengths over the draft; these tests pin the draft's own lengths
        # (test_adaptive_lengths_over_the_draft_keep_the_output runs the wrapper).
        assert isinstance(engine.proposer, AdaptiveProposer)
        engine.proposer = engine.proposer.inner
        yield engine


@pytest.fixture(scope="module")
def prompts(engine):
    return [engine.tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def long_prompt(engine):
    ids = engine.tokenizer.encode(LONG_PROMPT)
    assert len(ids) > 2 * MAX_BATCH_PREFILL_TOKENS
    return ids


@pytest.fixture(scope="module")
def greedy_reference(engine, prompts, long_prompt):
    """--speculate 0, each prompt alone (the long one last), with top tokens."""
    with speculating(engine, None):
        return [run_all(engine, [request(ids, top_n_tokens=2)])[0] for ids in prompts + [long_prompt]]


def run(engine, speculate: int, requests) -> list[Collected]:
    """Run with the engine's draft proposing `speculate` tokens per step (0: no speculation)."""
    draft = engine.proposer
    with speculating(engine, draft if speculate else None):
        draft.num_tokens, default = speculate or draft.num_tokens, draft.num_tokens
        try:
            return run_all(engine, requests)
        finally:
            draft.num_tokens = default


def test_the_flag_builds_a_draft_proposer_proposing_4(engine):
    assert isinstance(engine.proposer, DraftProposer) and engine.proposer.method == "draft"
    assert engine.config.speculate == engine.proposer.num_tokens == 4
    # Its own cache, the target's block count and size, the draft's layer count.
    assert engine.proposer.kv_cache is not engine.runner.kv_cache
    assert engine.proposer.kv_cache.num_blocks == engine.runner.kv_cache.num_blocks
    assert len(engine.proposer.kv_cache.layers) == 1 and len(engine.runner.kv_cache.layers) == 2


@pytest.mark.parametrize("speculate", [1, 2, 4])
def test_greedy_alone_equals_speculate_0(engine, prompts, greedy_reference, speculate):
    got = [run(engine, speculate, [request(ids, top_n_tokens=2)])[0] for ids in prompts]
    for result, ref in zip(got, greedy_reference):
        assert_same_tokens(result, ref)
        assert all(len(r) <= speculate + 1 for r in step_runs(result))
    assert sum(num_skipped(result) for result in got) > 0, "no draft guess was ever accepted"
    # ... and some were rejected: a step short of speculate + 1 tokens before the request's last step.
    assert any(len(r) < speculate + 1 for result in got for r in step_runs(result)[1:-1])
    assert_no_blocks_held(engine)


@pytest.mark.parametrize("speculate", [0, 1, 2, 4])
def test_greedy_concurrent_with_prefill_chunks_equals_speculate_0(engine, prompts, long_prompt, greedy_reference,
                                                                    speculate):
    """All prompts at once, the long one prefilling in chunks while the others verify guesses; the
    draft then catches up on the long prompt in chunks of the step budget too."""
    engine.scheduler.blocks.clear_cache()  # the reference computed these prompts: prefill them again
    with PlanRecorder(engine.scheduler) as recorder:
        got = run(engine, speculate, [request(ids, top_n_tokens=2) for ids in prompts + [long_prompt]])
    for result, ref in zip(got, greedy_reference):
        assert_same_tokens(result, ref)
    if speculate:
        assert sum(num_skipped(result) for result in got) > 0
        assert any(any(s == 0 for _, s in plan) and any(s > 1 for _, s in plan) for plan in recorder.plans)
    assert_no_blocks_held(engine)


def test_seeded_sampling_equals_speculate_0(engine, prompts):
    """Greedy draft guesses are a function of the accepted tokens, so exact-match acceptance keeps
    seeded draws: the same text as plain sampling."""
    sampling = [dict(do_sample=True, temperature=0.5, seed=7 + i) for i in range(len(prompts))]
    sampling[1].update(top_k=5, top_p=0.9)
    plain = run(engine, 0, [request(ids, top_n_tokens=1, **s) for ids, s in zip(prompts, sampling)])
    spec = run(engine, 4, [request(ids, top_n_tokens=1, **s) for ids, s in zip(prompts, sampling)])
    for result, ref in zip(spec, plain):
        assert_same_tokens(result, ref)
        assert result.finish.seed == ref.finish.seed
    assert sum(num_skipped(result) for result in spec) > 0
    assert_no_blocks_held(engine)


def test_blocks_return_after_finished_stopped_and_cancelled_requests(engine, prompts, greedy_reference):
    """Speculating requests that run to max_new_tokens, stop on a stop sequence, or are cancelled
    right after a multi-token step, all at once: every KV block (both models') is back afterwards."""
    decode = engine.tokenizer.decode
    stop = decode(greedy_reference[2].ids[:6])[len(decode(greedy_reference[2].ids[:5])):]
    cancelled = threading.Event()

    class CancelAfterMultiStep(Collected):
        def __call__(self, event):
            super().__call__(event)
            if event.num_step_tokens > 1 and not cancelled.is_set():
                engine.cancel(self.request_id)
                cancelled.set()

    finished, stopped, cancelling = Collected(), Collected(), CancelAfterMultiStep()
    engine.submit(request(prompts[0]), finished)
    engine.submit(request(prompts[2], stop=[stop]), stopped)
    cancelling.request_id = engine.submit(request(prompts[0], max_new_tokens=200), cancelling)
    for sink in (finished, stopped):
        assert sink.done.wait(120)
    assert cancelled.wait(120), "the cancelled request never had a multi-token step"
    assert_no_blocks_held(engine)
    assert finished.finish.reason == "length" and stopped.finish.reason == "stop_sequence"
    assert not cancelling.done.is_set()


def test_own_draft_accepts_every_guess(demo_model_dir, prompts, long_prompt):
    """The target as its own draft: each step after the first gives speculate + 1 tokens (fewer only
    where max_new_tokens cuts), greedy and sampled (the draft draws with the noise the target's row
    will use), alone and beside a chunked prefill: the draft's K/V stay right across rollbacks and
    catch-ups, and the output is --speculate 0's."""
    sampled = [dict(do_sample=True, temperature=1.0, seed=3), dict(do_sample=True, temperature=0.7, top_k=20,
                                                                    top_p=0.95, seed=4)]
    with running_engine(demo_model_dir, speculative_model=str(demo_model_dir), speculate=3, **ENGINE_FLAGS) as engine:
        engine.proposer = engine.proposer.inner  # the draft's own lengths (not adaptive ones)
        requests = [request(ids, top_n_tokens=2) for ids in prompts + [long_prompt]]
        requests += [request(prompts[0], top_n_tokens=2, **s) for s in sampled]
        with speculating(engine, None):
            refs = [run_all(engine, [r])[0] for r in requests]
        got = run_all(engine, requests)
        for result, ref in zip(got, refs):
            assert_same_tokens(result, ref)
            runs = step_runs(result)
            assert len(runs[0]) == 1 and all(len(r) == 4 for r in runs[1:-1]) and 1 <= len(runs[-1]) <= 4
        assert_no_blocks_held(engine)


def test_draft_state_rolls_back_to_the_accepted_guesses():
    """`observe` keeps the draft K/V of accepted guesses only; an unverified proposal keeps none."""
    seq = Sequence(0, request([1, 2, 3], max_new_tokens=27), [1, 2, 3], 3, 30)
    proposer = DraftProposer(None, None, None, None, None, num_tokens=4, max_step_tokens=8, max_step_seqs=1)
    seq.proposer_state = DraftState(num_computed=10, num_fed_proposals=3)  # 4 guesses, 3 of them fed
    proposer.observe(seq, num_proposed=4, num_accepted=3)  # 2 guesses matched
    assert seq.proposer_state.num_computed == 12 and seq.proposer_state.num_fed_proposals == 0
    seq.proposer_state = DraftState(num_computed=10, num_fed_proposals=3)
    proposer.observe(seq, num_proposed=4, num_accepted=5)  # all 4 matched: the 4th was never fed
    assert seq.proposer_state.num_computed == 13
    assert proposer._state(seq).num_fed_proposals == 0  # a new proposal forgets unverified guesses


def build(model_dir, **config):
    return build_engine(ServerConfig(model_id=str(model_dir), **config), BackendRegistry().select("cpu"),
                        progress=False)


def test_a_draft_with_another_vocabulary_is_refused(demo_model_dir, tmp_path):
    first, _ = write_relabelled_tokenizer(demo_model_dir, tmp_path / "relabelled")
    with pytest.raises(DraftVocabularyMismatch, match=r"different tokenizer vocabulary.*2 tokens differ"):
        build(demo_model_dir, speculative_model=str(tmp_path / "relabelled"), **ENGINE_FLAGS)
    # Another vocabulary size: refused before any weight is read.
    bigger = write_truncated_draft(demo_model_dir, tmp_path / "bigger", num_layers=1)
    config = json.loads((bigger / "config.json").read_text())
    config["vocab_size"] += 128
    (bigger / "config.json").write_text(json.dumps(config))
    with pytest.raises(DraftVocabularyMismatch, match="has a vocabulary of .* ids, the model has"):
        build(demo_model_dir, speculative_model=str(bigger), **ENGINE_FLAGS)


def test_the_kv_cache_budget_holds_both_models_blocks(demo_model_dir, draft_dir):
    """Under a fixed --kv-cache-gib, a block costs the target's K/V plus the draft's: with a draft of
    half the target's layers, 2/3 of the blocks."""
    budget = dict(dtype="float32", kv_cache_gib=2 / 1024, max_total_tokens=256)
    alone = build(demo_model_dir, **budget).scheduler.blocks.num_blocks
    with_draft = build(demo_model_dir, speculative_model=str(draft_dir), **budget).scheduler.blocks.num_blocks
    assert with_draft == alone * 2 // 3


def test_speculative_model_sets_the_default_and_refuses_speculate_0():
    assert ServerConfig(speculative_model="d").speculate == 4
    assert ServerConfig(speculative_model="d", speculate=2).speculate == 2
    assert ServerConfig().speculate is None
    with pytest.raises(ConfigError, match="needs `--speculate` >= 1"):
        ServerConfig(speculative_model="d", speculate=0)


def test_smollm2_with_its_first_layers_as_draft_equals_speculate_0(smollm2_dir, tmp_path):
    """The real model (tied embeddings) with its first 6 of 30 layers as the draft, on input-grounded
    code: speculate 2 and 4, alone and beside a plain request, give --speculate 0's ids."""
    draft = write_truncated_draft(smollm2_dir, tmp_path / "smollm2-6", num_layers=6)
    with running_engine(smollm2_dir, speculative_model=str(draft), dtype="float32", max_batch_prefill_tokens=256,
                        max_batch_total_tokens=4096, max_total_tokens=1024) as engine:
        engine.proposer = engine.proposer.inner  # the draft's own lengths (not adaptive ones)
        prompt = engine.tokenizer.encode(SMOLLM2_PROMPT)
        other = engine.tokenizer.encode("The capital of France is")
        requests = [request(prompt, max_new_tokens=32), request(other, max_new_tokens=16)]
        ref, other_ref = run(engine, 0, requests)
        for speculate in (2, 4):
            got, other_got = run(engine, speculate, requests)
            assert_same_tokens(got, ref)
            assert_same_tokens(other_got, other_ref)
            assert num_skipped(got) > 0
        assert_no_blocks_held(engine)


def test_a_failing_draft_forward_costs_guesses_not_output(engine, prompts, greedy_reference):
    """The draft's forward raises in two steps: those steps verify no guesses, the requests still get
    --speculate 0's ids, the engine stays healthy and the draft catches up afterwards."""
    draft = engine.proposer
    num_failures = []

    def failing_forward(batch, kv_cache):
        if len(num_failures) < 2:
            num_failures.append(1)
            raise RuntimeError("draft out of memory")
        return type(draft.model).forward(draft.model, batch, kv_cache)

    draft.model.forward = failing_forward
    try:
        got = run(engine, 4, [request(ids, top_n_tokens=2) for ids in prompts])
    finally:
        del draft.model.forward
    assert len(num_failures) == 2 and engine.is_healthy
    for result, ref in zip(got, greedy_reference):
        assert_same_tokens(result, ref)
    assert sum(num_skipped(result) for result in got) > 0
    assert_no_blocks_held(engine)


def test_adaptive_lengths_over_the_draft_keep_the_output(engine, prompts, long_prompt, greedy_reference):
    """As served: adaptive lengths over the draft, with a knee so small that most steps give few or no
    guesses, so the draft skips sequences for steps and must catch up on the tokens accepted meanwhile."""
    adaptive = AdaptiveProposer(engine.proposer, knee_rows=0.5)
    with speculating(engine, adaptive):
        got = run_all(engine, [request(ids, top_n_tokens=2) for ids in prompts + [long_prompt]])
    for result, ref in zip(got, greedy_reference):
        assert_same_tokens(result, ref)
    assert_no_blocks_held(engine)
