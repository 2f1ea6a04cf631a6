"""Multi-token steps on the demo model: a fixed test proposer guesses k tokens per step, the step
verifies all k + 1 positions of the sequence, the engine keeps the matching prefix plus the bonus
token and rolls the rejected positions back; request states see exactly the accepted tokens.

Oracles: transformers `generate` in float32 (greedy, repetition penalty, allowed-token masks through
`prefix_allowed_tokens_fn`), the HF tokenizer with a brute-force stop search, and for seeded sampling
the engine's own run without a proposer (the seeded draw is tgserve's, no other library has it).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tgserve.core.request import GenerationRequest, SamplingParams, StoppingParams
from tgserve.core.request_state import MaskingState, RequestState
from tgserve.core.token_bitmask import pack_allowed
from tgserve.core.speculation.acceptance import Proposer

from .engine_harness import run_all, running_engine

PROMPTS = ["The river ran", "Once upon a time there was a small garden behind the old house"]
NEW_TOKENS = 20
K = 4  # proposed tokens per step


@pytest.fixture(scope="module")
def engine(demo_model_dir):
    with running_engine(demo_model_dir, dtype="float32", max_batch_prefill_tokens=64, max_batch_total_tokens=4096,
                        max_total_tokens=512) as engine:
        yield engine


@pytest.fixture(scope="module")
def hf(demo_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(demo_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(demo_model_dir), dtype=torch.float32).eval()
    return tokenizer, model


def _generate(hf, prompt_ids, **kwargs) -> list[int]:
    """transformers' greedy continuation of `prompt_ids` (no eos stop)."""
    tokenizer, model = hf
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=None, pad_token_id=tokenizer.pad_token_id, **kwargs)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def prompts(hf):
    return [hf[0](p).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def greedy(hf, prompts):
    return [_generate(hf, ids) for ids in prompts]


class FixedProposer(Proposer):
    """Proposes K tokens of a known continuation; at its n-th call the guess at index n % (K + 1) is
    wrong (n % (K + 1) == K: all right), so steps keep 1, 2, ..., K + 1 tokens in turn. Records the
    number of accepted generated tokens at every call. Prompts it does not know get no proposals."""

    def __init__(self, continuations: dict[tuple, list[int]], vocab_size: int, is_wrong_sometimes: bool = True):
        self.continuations = continuations
        self.vocab_size = vocab_size
        self.is_wrong_sometimes = is_wrong_sometimes
        self.calls: dict[tuple, list[int]] = {}

    def propose(self, seq, max_tokens):
        prompt = tuple(seq.token_ids[:seq.num_prompt_tokens])
        if prompt not in self.continuations:
            return []
        calls = self.calls.setdefault(prompt, [])
        generated = seq.num_generated_tokens
        calls.append(generated)
        guess = list(self.continuations[prompt][generated:generated + K])
        guess += [0] * (K - len(guess))
        wrong = (len(calls) - 1) % (K + 1)
        if self.is_wrong_sometimes and wrong < K:
            guess[wrong] = (guess[wrong] + 1) % self.vocab_size
        return guess[:max_tokens]


@contextlib.contextmanager
def proposing(engine, proposer, make_request_states=None):
    """Set the engine's proposer (and request states) for one test; restore the defaults after."""
    defaults = engine.proposer, engine.make_request_states
    engine.proposer = proposer
    if make_request_states is not None:
        engine.make_request_states = make_request_states
    try:
        yield proposer
    finally:
        engine.proposer, engine.make_request_states = defaults


def _request(ids, max_new_tokens=NEW_TOKENS, stop=(), **sampling) -> GenerationRequest:
    return GenerationRequest(list(ids), SamplingParams(**sampling),
                             StoppingParams(max_new_tokens=max_new_tokens, stop_sequences=tuple(stop),
                                            ignore_eos_token=True))


def _kept_per_step(calls: list[int]) -> list[int]:
    return [b - a for a, b in zip(calls, calls[1:])]


def test_verified_steps_with_rejections_equal_greedy_decoding(engine, prompts, greedy):
    """Mixed batch: the first prompt verifies K guesses per step (some wrong), the second decodes one
    token per step; both equal transformers' greedy output token for token."""
    with proposing(engine, FixedProposer({tuple(prompts[0]): greedy[0]}, engine.runner.vocab_size)) as proposer:
        verified, plain = run_all(engine, [_request(prompts[0]), _request(prompts[1])])
    assert verified.ids == greedy[0]
    assert plain.ids == greedy[1]
    kept = _kept_per_step(proposer.calls[tuple(prompts[0])])
    assert {1, 2, K + 1} <= set(kept)  # rejections rolled back, partial and whole acceptances
    assert [e.index for e in verified.events] == list(range(1, NEW_TOKENS + 1))
    assert verified.finish.reason == "length" and verified.finish.generated_tokens == NEW_TOKENS
    blocks = engine.scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_usable_blocks


def test_max_new_tokens_bounds_the_guesses(engine, prompts, greedy):
    """All guesses right: the prefill gives token 1, the next step keeps 5 (6 in all); with
    max_new_tokens=8 two are left, so the engine allows one guess, and that step keeps 2 and ends the
    request exactly: no position past max_new_tokens is ever computed."""
    with proposing(engine, FixedProposer({tuple(prompts[0]): greedy[0]}, engine.runner.vocab_size,
                                         is_wrong_sometimes=False)) as proposer:
        (got,) = run_all(engine, [_request(prompts[0], max_new_tokens=8)])
    assert _kept_per_step(proposer.calls[tuple(prompts[0])]) == [K + 1]
    assert got.ids == greedy[0][:8]
    assert [e.num_step_tokens for e in got.events] == [1, 0, 0, 0, 0, 5, 0, 2]
    assert got.finish.reason == "length" and got.finish.generated_tokens == 8
    (after,) = run_all(engine, [_request(prompts[1], max_new_tokens=2)])  # the engine still serves
    assert after.ids == greedy[1][:2]


def test_stop_sequence_inside_an_accepted_append(engine, hf, prompts, greedy):
    """The stop is the text the 4th generated token adds, which the step keeping tokens 2..6 accepts;
    the tokens after it in that step are not emitted. Reference: first prefix whose decoded text holds it."""
    tokenizer = hf[0]
    ref = greedy[0]
    stop = tokenizer.decode(ref[:4])[len(tokenizer.decode(ref[:3])):]
    assert stop.strip(), "pick another token: this one adds no visible text"
    cut = next(i for i in range(len(ref)) if stop in tokenizer.decode(ref[:i + 1]))
    assert 1 <= cut < 5  # inside the first multi-token step (generated tokens 2..6)
    with proposing(engine, FixedProposer({tuple(prompts[0]): ref}, engine.runner.vocab_size,
                                         is_wrong_sometimes=False)):
        (got,) = run_all(engine, [_request(prompts[0], stop=[stop])])
    assert got.ids == ref[:cut + 1]
    assert got.finish.reason == "stop_sequence" and got.finish.generated_tokens == cut + 1
    (after,) = run_all(engine, [_request(prompts[1], max_new_tokens=2)])  # the engine still serves
    assert after.ids == greedy[1][:2]


class Recorder(RequestState):
    def __init__(self):
        self.accepted: list[int] = []

    def on_accept(self, token_id):
        self.accepted.append(token_id)


def test_request_states_see_exactly_the_accepted_tokens(engine, prompts, greedy):
    recorders = []

    def make_states(request):
        recorders.append(Recorder())
        return (recorders[-1],)

    with proposing(engine, FixedProposer({tuple(prompts[0]): greedy[0]}, engine.runner.vocab_size), make_states):
        (got,) = run_all(engine, [_request(prompts[0])])
    assert got.ids == greedy[0]
    assert [r.accepted for r in recorders] == [greedy[0]]


def test_repetition_penalty_over_verified_positions_equals_transformers(engine, hf, prompts):
    """Row j of a verifying sequence is penalised over its accepted tokens and its first j guesses."""
    reference = _generate(hf, prompts[1], repetition_penalty=3.0)
    with proposing(engine, FixedProposer({tuple(prompts[1]): reference}, engine.runner.vocab_size)):
        penalised, plain = run_all(engine, [_request(prompts[1], repetition_penalty=3.0), _request(prompts[0])])
    assert penalised.ids == reference
    assert plain.ids == _generate(hf, prompts[0])


def test_seeded_sampling_with_verification_equals_plain_sampling(engine, prompts):
    """Each verified position draws with its own token index, as the plain run does."""
    sampling = {"do_sample": True, "temperature": 0.8, "seed": 1234}
    (plain,) = run_all(engine, [_request(prompts[0], **sampling)])
    with proposing(engine, FixedProposer({tuple(prompts[0]): plain.ids}, engine.runner.vocab_size)) as proposer:
        (verified,) = run_all(engine, [_request(prompts[0], **sampling)])
    assert verified.ids == plain.ids
    assert K + 1 in _kept_per_step(proposer.calls[tuple(prompts[0])])


class AllowOnly(MaskingState):
    """Allows a fixed set of ids at every position (also after proposed ones)."""

    def __init__(self, allowed_ids, vocab_size):
        mask = torch.zeros(1, vocab_size, dtype=torch.bool)
        mask[0, list(allowed_ids)] = True
        self.bits = pack_allowed(mask)

    @classmethod
    def fill_allowed(cls, jobs, bitmask):
        for state, proposed, row in jobs:
            bitmask[row:row + len(proposed) + 1] = state.bits


def test_allowed_mask_equals_transformers_prefix_allowed_tokens(engine, hf, prompts, greedy):
    """A masked request (with and without verification) batched with an unmasked one: the masked
    output is transformers' greedy under the same allowed ids, the unmasked one plain greedy."""
    vocab = engine.runner.vocab_size
    allowed = sorted(set(range(40, 400, 3)) - set(greedy[0]))
    reference = _generate(hf, prompts[0], prefix_allowed_tokens_fn=lambda batch_id, ids: allowed)
    assert set(reference) <= set(allowed)
    masked_prompt = tuple(prompts[0])

    def make_states(request):
        return (AllowOnly(allowed, vocab),) if tuple(request.input_ids) == masked_prompt else ()

    with proposing(engine, None, make_states):
        masked, plain = run_all(engine, [_request(prompts[0]), _request(prompts[1])])
    assert masked.ids == reference
    assert plain.ids == greedy[1]
    with proposing(engine, FixedProposer({masked_prompt: reference}, vocab), make_states):
        (verified,) = run_all(engine, [_request(prompts[0])])
    assert verified.ids == reference
