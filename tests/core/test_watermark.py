"""The Kirchenbauer watermark: greenlists, the logit bias, detection by z-score, batch independence.

Unit tests drive `WatermarkBatch` and `sample` directly; the end-to-end ones sample text from the
demo model through a real engine and detect the watermark in its token ids.
"""
from __future__ import annotations

import math

import pytest
import torch

from tgserve.core.sampling import SamplingBatch, sample
from tgserve.core.watermark import DEFAULT_DELTA, DEFAULT_GAMMA, WatermarkBatch, detect, is_green

from .engine_harness import request, run_all, running_engine

VOCAB = 4096
DETECTION_Z = 4.0  # the paper's threshold: z > 4 means watermarked


def _watermark(prev_ids: list[int], flags: list[bool], gamma: float = DEFAULT_GAMMA,
               delta: float = DEFAULT_DELTA) -> WatermarkBatch:
    return WatermarkBatch(torch.tensor(prev_ids), torch.tensor(flags), gamma, delta)


def _sampling(num_rows: int, seeds: list[int], watermark: WatermarkBatch | None) -> SamplingBatch:
    """Plain sampling at temperature 1 (no warpers, no penalties) for `num_rows` rows."""
    ones, zeros = torch.ones(num_rows), torch.zeros(num_rows, dtype=torch.int64)
    return SamplingBatch(
        temperature=ones, top_k=zeros, top_p=ones, typical_p=ones, repetition_penalty=ones,
        frequency_penalty=torch.zeros(num_rows), seed=torch.tensor(seeds), step=zeros,
        is_greedy=torch.zeros(num_rows, dtype=torch.bool), token_history=None, any_sampling=True,
        any_top_k=False, any_top_p=False, any_typical_p=False, max_top_n=0, watermark=watermark)


def _reference_is_green(prev: int, token: int, gamma: float) -> bool:
    """The documented greenlist hash, rewritten in plain Python ints from core/watermark.py's
    description (hash key 15485863, salt 0x7F4A7C15, the mix32 avalanche of core/sampling.py), so
    generator and detector are checked against code that does not share `is_green`."""
    mask = 0xFFFFFFFF

    def mix(x: int) -> int:
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & mask
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & mask
        return x ^ (x >> 16)

    row_key = mix((prev * 15485863) & mask)
    bits = mix(((mix(token) ^ row_key) + 0x7F4A7C15) & mask)
    return bits < int(gamma * 2**32)


@pytest.mark.parametrize("prev", [0, 1, 2, 49151, 123456, 2**31 - 1])
def test_greenlist_matches_an_independent_reimplementation_of_the_documented_hash(prev):
    ids = list(range(VOCAB))
    expected = [_reference_is_green(prev, t, DEFAULT_GAMMA) for t in ids]
    got = is_green(torch.tensor([[prev]]), torch.tensor([ids]), DEFAULT_GAMMA)[0].tolist()
    assert got == expected
    assert 0.45 < sum(expected) / VOCAB < 0.55


# --- greenlists and the bias ------------------------------------------------------------------------

@pytest.mark.parametrize("gamma", [0.25, 0.5])
def test_greenlist_is_a_gamma_share_seeded_by_the_previous_token(gamma):
    ids = torch.arange(VOCAB).unsqueeze(0)
    green = is_green(torch.arange(64).unsqueeze(1), ids, gamma)  # [64 prev tokens, VOCAB]
    share = green.float().mean(dim=1)
    assert (share - gamma).abs().max() < 0.04  # binomial: sd = sqrt(g(1-g)/VOCAB) < 0.008
    assert torch.equal(green, is_green(torch.arange(64).unsqueeze(1), ids, gamma))  # deterministic
    overlap = (green[0] & green[1]).float().mean()
    assert abs(overlap - gamma * gamma) < 0.04  # different previous tokens: unrelated lists


def test_bias_is_delta_on_green_ids_of_watermarked_rows_only():
    logits = torch.randn(3, VOCAB)
    out = _watermark([7, 7, 9], [True, False, True]).apply(logits)
    ids = torch.arange(VOCAB)
    for row, prev in ((0, 7), (2, 9)):
        green = is_green(torch.tensor(prev), ids, DEFAULT_GAMMA)
        torch.testing.assert_close(out[row][green], logits[row][green] + DEFAULT_DELTA)
        torch.testing.assert_close(out[row][~green], logits[row][~green])
    assert torch.equal(out[1], logits[1])


def test_watermark_moves_the_greedy_choice_into_the_greenlist():
    logits = torch.zeros(1, VOCAB)
    red = (~is_green(torch.tensor(5), torch.arange(VOCAB), DEFAULT_GAMMA)).nonzero()[0, 0]
    logits[0, red] = 1.0  # the best token is red, by less than delta
    batch = _sampling(1, [0], _watermark([5], [True]))
    batch.is_greedy, batch.any_sampling = torch.ones(1, dtype=torch.bool), False  # all greedy: TGI biases these too
    chosen = sample(logits, batch).next_ids[0]
    assert chosen != red and is_green(torch.tensor(5), chosen, DEFAULT_GAMMA)
    batch.watermark = None
    assert sample(logits, batch).next_ids[0] == red


# --- detection --------------------------------------------------------------------------------------

def test_sampled_tokens_are_mostly_green_only_with_the_watermark():
    """Uniform logits, one draw per (seed, prev token): green share e^d / (1 + e^d) ~ 0.88 vs 0.5."""
    num_rows = 400
    prev = list(range(1000, 1000 + num_rows))
    logits = torch.zeros(num_rows, VOCAB)
    for is_on, low, high in ((True, 0.82, 0.94), (False, 0.42, 0.58)):
        batch = _sampling(num_rows, list(range(num_rows)), _watermark(prev, [is_on] * num_rows))
        share = is_green(torch.tensor(prev), sample(logits, batch).next_ids, DEFAULT_GAMMA).float().mean()
        assert low < share < high, (is_on, share)


def test_detect_scores_each_token_after_its_predecessor():
    ids = torch.arange(VOCAB)
    greens = ids[is_green(torch.tensor(3), ids, DEFAULT_GAMMA)]
    reds = ids[~is_green(torch.tensor(3), ids, DEFAULT_GAMMA)]
    assert detect([3, int(greens[0])]).num_green_tokens == 1
    assert detect([3, int(reds[0])]).num_green_tokens == 0
    assert detect([3]) == detect([]) and detect([3]).num_tokens_scored == 0
    text = torch.randint(0, VOCAB, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    num_green = sum(bool(is_green(torch.tensor(a), torch.tensor(b), DEFAULT_GAMMA)) for a, b in zip(text, text[1:]))
    score = detect(text)
    assert (score.num_tokens_scored, score.num_green_tokens) == (199, num_green)
    assert math.isclose(score.z_score, (num_green - 99.5) / math.sqrt(199 * 0.25))
    assert abs(score.z_score) < DETECTION_Z  # random text is not watermarked


# --- end to end on the demo model -------------------------------------------------------------------

PROMPTS = ("Once upon a time", "The river ran", "In the garden", "A small dog")


@pytest.fixture(scope="module")
def engine(demo_model_dir):
    with running_engine(demo_model_dir, max_batch_prefill_tokens=256, max_batch_total_tokens=4096,
                        max_total_tokens=512) as engine:
        yield engine


def _pooled_z_score(engine, is_watermarked: bool) -> float:
    """Sample 24 seeded texts of 64 tokens and score all their tokens together.

    Temperature 1.5: the watermark can only move tokens where the model hesitates, and the tiny
    demo model is sure of itself at temperature 1 (the paper's low-entropy caveat).
    """
    requests = [request(engine.tokenizer.encode(p), 64, do_sample=True, temperature=1.5, seed=s,
                        watermark=is_watermarked) for s in range(6) for p in PROMPTS]
    scores = [detect([req.input_ids[-1], *got.ids]) for req, got in zip(requests, run_all(engine, requests))]
    num_scored = sum(s.num_tokens_scored for s in scores)
    num_green = sum(s.num_green_tokens for s in scores)
    assert num_scored > 1000
    return (num_green - DEFAULT_GAMMA * num_scored) / math.sqrt(num_scored * DEFAULT_GAMMA * (1 - DEFAULT_GAMMA))


def test_demo_model_text_carries_the_watermark_only_when_asked(engine):
    assert _pooled_z_score(engine, is_watermarked=True) > 2 * DETECTION_Z
    assert abs(_pooled_z_score(engine, is_watermarked=False)) < DETECTION_Z


def test_reference_detector_separates_watermarked_from_plain_engine_text(engine):
    """Score engine output with `_reference_is_green` (not the engine's `is_green`): the pooled z-score
    with the watermark on is far above the threshold and the one with it off is not."""
    def z_score(is_watermarked: bool) -> float:
        requests = [request(engine.tokenizer.encode(p), 64, do_sample=True, temperature=1.5, seed=100 + s,
                            watermark=is_watermarked) for s in range(6) for p in PROMPTS]
        pairs = [(a, b) for req, got in zip(requests, run_all(engine, requests))
                 for a, b in zip([req.input_ids[-1], *got.ids], got.ids)]
        num_green = sum(_reference_is_green(a, b, DEFAULT_GAMMA) for a, b in pairs)
        return (num_green - 0.5 * len(pairs)) / math.sqrt(len(pairs) * 0.25)

    on, off = z_score(True), z_score(False)
    assert on > 2 * DETECTION_Z and abs(off) < DETECTION_Z, (on, off)


def test_watermarked_seeded_row_does_not_depend_on_its_batch(engine):
    prompt = engine.tokenizer.encode("The river ran")
    target = dict(do_sample=True, temperature=1.5, seed=77, watermark=True)
    (alone,) = run_all(engine, [request(prompt, 24, **target)])
    crowd = [request(engine.tokenizer.encode(f"Other prompt {i}"), 24, do_sample=bool(i % 2), seed=i,
                     watermark=i < 2) for i in range(4)]
    together = run_all(engine, crowd[:2] + [request(prompt, 24, **target)] + crowd[2:])
    assert together[2].ids == alone.ids
    (unmarked,) = run_all(engine, [request(prompt, 24, **dict(target, watermark=False))])
    assert unmarked.ids != alone.ids

