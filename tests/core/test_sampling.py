"""The sampler: greedy, seeded Gumbel draws, top-k / top-p / typical-p, penalties, top-n tokens.

SamplingBatch tensors are built directly, one dict of TGI parameters per row.
"""
from __future__ import annotations

import math

import pytest
import torch
from transformers import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper,
                          TypicalLogitsWarper)

from tgserve.core.sampling import SamplingBatch, argmax_rows, sample
from tgserve.core.token_bitmask import pack_allowed

_GREEDY = {"greedy": True}


def _batch(rows: list[dict], history: list[list[int]] | None = None, vocab: int | None = None,
           max_top_n: int = 0, force_flags: bool = False) -> SamplingBatch:
    """rows: per-row overrides of TGI's neutral parameters; history is padded with `vocab`."""
    def column(name, default, dtype):
        return torch.tensor([row.get(name, default) for row in rows], dtype=dtype)

    greedy = [row.get("greedy", False) for row in rows]
    token_history = None
    if history is not None:
        width = max(len(h) for h in history)
        token_history = torch.tensor([h + [vocab] * (width - len(h)) for h in history], dtype=torch.int64)
    return SamplingBatch(
        temperature=column("temperature", 1.0, torch.float32), top_k=column("top_k", 0, torch.int64),
        top_p=column("top_p", 1.0, torch.float32), typical_p=column("typical_p", 1.0, torch.float32),
        repetition_penalty=column("repetition_penalty", 1.0, torch.float32),
        frequency_penalty=column("frequency_penalty", 0.0, torch.float32),
        seed=column("seed", 0, torch.int64), step=column("step", 0, torch.int64),
        is_greedy=torch.tensor(greedy), token_history=token_history,
        any_sampling=force_flags or not all(greedy),
        any_top_k=force_flags or any(row.get("top_k", 0) > 0 for row in rows),
        any_top_p=force_flags or any(row.get("top_p", 1.0) < 1.0 for row in rows),
        any_typical_p=force_flags or any(row.get("typical_p", 1.0) < 1.0 for row in rows),
        max_top_n=max_top_n)


def _logits(num_rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(num_rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def _draw_many(logits_row: torch.Tensor, params: dict, seeds: range, step: int | None = None) -> torch.Tensor:
    """Token drawn for one row of logits under each seed (or, with `step`=None, each step of seed 0)."""
    rows = [dict(params, seed=s, step=0) if step is not None else dict(params, seed=0, step=s) for s in seeds]
    return sample(logits_row.expand(len(rows), -1).contiguous(), _batch(rows)).next_ids


def _full_logprobs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """[S, vocab] processed log-probabilities, read back through the top-n output."""
    out = sample(logits, batch)
    return torch.empty_like(logits).scatter_(1, out.top_ids, out.top_logprobs)


# --- greedy and logprobs ---------------------------------------------------------------------------

def test_greedy_rows_take_argmax_with_its_logprob():
    logits = _logits(6, 50)
    out = sample(logits, _batch([_GREEDY] * 6))
    assert torch.equal(out.next_ids, logits.argmax(-1))
    expected = torch.log_softmax(logits, -1).gather(1, out.next_ids.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(out.logprobs, expected)
    assert out.top_ids is None and out.top_logprobs is None


def test_greedy_rows_stay_argmax_beside_sampled_rows():
    logits = _logits(4, 30, seed=1)
    rows = [_GREEDY, {"seed": 5, "temperature": 1.5}, _GREEDY, {"seed": 6, "top_k": 3}]
    out = sample(logits, _batch(rows))
    assert out.next_ids[0] == logits[0].argmax() and out.next_ids[2] == logits[2].argmax()


def test_sampled_logprob_is_under_the_processed_distribution():
    logits = _logits(8, 40, seed=2)
    rows = [{"seed": s, "temperature": 0.7} for s in range(8)]
    out = sample(logits, _batch(rows))
    expected = torch.log_softmax(logits / 0.7, -1).gather(1, out.next_ids.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(out.logprobs, expected)


def test_top_k_one_equals_greedy_even_when_sampling():
    logits = _logits(1, 64, seed=3, scale=0.3)  # a flat distribution: plain sampling would wander
    draws = _draw_many(logits[0], {"top_k": 1, "temperature": 1.3}, range(200), step=0)
    assert (draws == logits[0].argmax()).all()
    out = sample(logits.expand(3, -1).contiguous(), _batch([{"top_k": 1, "seed": s} for s in range(3)]))
    torch.testing.assert_close(out.logprobs, torch.zeros(3))


# --- seeded draws ------------------------------------------------------------------------------------

def test_seeded_row_does_not_depend_on_its_batch():
    vocab = 80
    target_logits = _logits(1, vocab, seed=4, scale=1.0)[0]
    target = {"seed": 1234, "step": 3, "temperature": 0.8, "top_p": 0.95}
    others = _logits(5, vocab, seed=5)
    other_rows = [_GREEDY, {"seed": 7, "top_k": 5}, {"seed": 8, "typical_p": 0.5},
                  {"seed": 9, "repetition_penalty": 1.5, "frequency_penalty": 0.3}, {"seed": 1234, "step": 4}]
    alone = sample(target_logits.unsqueeze(0), _batch([target]))
    layouts = [[0, 1, "t"], ["t", 4, 3, 2, 1, 0], [2, "t", 3], [4, "t"]]
    for layout in layouts:
        logits = torch.stack([target_logits if i == "t" else others[i] for i in layout])
        rows = [target if i == "t" else other_rows[i] for i in layout]
        history = [[1, 2, 2, 9] if i == 3 else [] for i in layout] if 3 in layout else None
        out = sample(logits, _batch(rows, history=history, vocab=vocab))
        where = layout.index("t")
        assert out.next_ids[where] == alone.next_ids[0], layout
        torch.testing.assert_close(out.logprobs[where], alone.logprobs[0])


def test_different_seeds_and_steps_draw_differently():
    logits = torch.zeros(100)  # uniform: every draw is the noise's argmax
    by_seed = _draw_many(logits, {}, range(64), step=0)
    by_step = _draw_many(logits, {}, range(64))
    assert len(set(by_seed.tolist())) > 40
    assert len(set(by_step.tolist())) > 40
    high_bits = sample(logits.expand(64, -1).contiguous(),
                       _batch([{"seed": s + (1 << 40)} for s in range(64)])).next_ids
    assert (high_bits != by_seed).sum() > 50  # the seed's high 32 bits matter too
    again = _draw_many(logits, {}, range(64), step=0)
    assert torch.equal(by_seed, again)


def test_the_hash_value_that_rounds_to_one_never_wins_the_draw():
    """Seed 170, step 0: vocabulary id 97881 hashes to the top 24-bit value, whose uniform rounded to
    1.0 in float32 and made its noise +inf: the id was drawn whatever its probability, and a masked
    (-inf) id became NaN, which argmax also takes. A vocabulary of Qwen2's size hit this in 0.9% of rows."""
    vocab, unlikely = 151936, 97881
    logits = torch.zeros(1, vocab)
    logits[0, unlikely] = -1e4  # probability ~0: never drawn
    assert sample(logits, _batch([{"seed": 170}])).next_ids.item() != unlikely
    logits[0, unlikely] = float("-inf")  # masked
    drawn = sample(logits, _batch([{"seed": 170}]))
    assert drawn.next_ids.item() != unlikely and math.isfinite(drawn.logprobs.item())


# Chi-square critical value for 5 degrees of freedom at p = 1e-6 (scipy.stats.chi2.isf(1e-6, 5) = 35.9).
_CHI2_5DOF_1E6 = 35.9


@pytest.mark.parametrize("vary", ["seed", "step"])
def test_gumbel_draws_follow_softmax(vary):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    num_draws = 40_000
    draws = _draw_many(logits, {}, range(num_draws), step=0 if vary == "seed" else None)
    observed = torch.bincount(draws, minlength=6).double()
    expected = torch.softmax(logits.double(), -1) * num_draws
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < _CHI2_5DOF_1E6, (observed.tolist(), expected.tolist())
    assert (observed / num_draws - expected / num_draws).abs().max() < 0.01


def test_temperature_sharpens_the_draw():
    logits = torch.tensor([1.0, 0.0, -1.0])
    draws = _draw_many(logits, {"temperature": 0.5}, range(20_000), step=0)
    frequency = torch.bincount(draws, minlength=3).double() / 20_000
    torch.testing.assert_close(frequency, torch.softmax(logits.double() / 0.5, -1), atol=0.015, rtol=0)


# --- warpers -----------------------------------------------------------------------------------------

def test_top_p_draws_only_from_the_nucleus():
    probs = torch.tensor([0.04, 0.25, 0.06, 0.5, 0.15])  # sorted: 0.5, 0.25, 0.15 | 0.06, 0.04
    logits = probs.log()
    nucleus = {3, 1, 4}  # smallest set with mass >= 0.8
    num_draws = 10_000
    draws = _draw_many(logits, {"top_p": 0.8}, range(num_draws), step=0)
    assert set(draws.tolist()) == nucleus
    frequency = torch.bincount(draws, minlength=5).double() / num_draws
    renormalized = torch.tensor([0.0, 0.25, 0.0, 0.5, 0.15], dtype=torch.float64) / 0.9
    torch.testing.assert_close(frequency, renormalized, atol=0.02, rtol=0)
    out = sample(logits.expand(4, -1).contiguous(), _batch([{"top_p": 0.8, "seed": s} for s in range(4)]))
    torch.testing.assert_close(out.logprobs, renormalized[out.next_ids].log().float())


def test_top_k_draws_only_from_the_k_most_likely():
    logits = _logits(1, 30, seed=6, scale=0.5)[0]
    allowed = set(logits.topk(4).indices.tolist())
    draws = _draw_many(logits, {"top_k": 4}, range(2_000), step=0)
    assert set(draws.tolist()) == allowed


def test_typical_p_keeps_the_tokens_closest_to_the_entropy():
    # Entropy 0.94 nats: the 0.7 token (surprise 0.36) is more typical than the 0.1 ones (2.30).
    probs = torch.tensor([0.1, 0.7, 0.1, 0.1])
    assert set(_draw_many(probs.log(), {"typical_p": 0.2}, range(500), step=0).tolist()) == {1}
    assert set(_draw_many(probs.log(), {"typical_p": 0.95}, range(2_000), step=0).tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize(("name", "value", "warper"), [
    ("top_k", 5, lambda v: TopKLogitsWarper(top_k=v)),
    ("top_p", 0.7, lambda v: TopPLogitsWarper(top_p=v)),
    ("top_p", 0.3, lambda v: TopPLogitsWarper(top_p=v)),
    ("typical_p", 0.5, lambda v: TypicalLogitsWarper(mass=v)),
    ("typical_p", 0.9, lambda v: TypicalLogitsWarper(mass=v)),
])
def test_warpers_match_transformers(name, value, warper):
    vocab = 40
    logits = _logits(4, vocab, seed=12, scale=1.5)
    rows = [{"seed": s, name: value} for s in range(4)]
    ours = _full_logprobs(logits, _batch(rows, max_top_n=vocab))
    reference = torch.log_softmax(warper(value)(torch.zeros(4, 1, dtype=torch.int64), logits.clone()), -1)
    assert torch.equal(ours.isfinite(), reference.isfinite())
    kept = reference.isfinite()
    torch.testing.assert_close(ours[kept], reference[kept])


def test_neutral_warper_values_change_nothing():
    logits = _logits(16, 40, seed=7, scale=1.5)
    rows = [{"seed": 100 + i, "step": i, "temperature": 0.9} for i in range(16)]
    plain = sample(logits, _batch(rows))
    neutral = sample(logits, _batch([dict(r, top_k=0, top_p=1.0, typical_p=1.0) for r in rows], force_flags=True))
    assert torch.equal(plain.next_ids, neutral.next_ids)
    torch.testing.assert_close(plain.logprobs, neutral.logprobs)


# --- penalties ---------------------------------------------------------------------------------------

def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    batch = _batch([{"greedy": True, "repetition_penalty": 2.0}], history=[[0, 1, 1]], vocab=4, max_top_n=4)
    expected = torch.log_softmax(torch.tensor([[1.0, -4.0, 1.0, 0.5]]), -1)
    torch.testing.assert_close(_full_logprobs(logits, batch), expected)


@pytest.mark.parametrize("penalty", [1.3, 0.8, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    vocab = 32
    logits = _logits(3, vocab, seed=8)
    history = [[1, 5, 5, 30, 2], [0, 31], [7, 7, 7, 8, 9, 10, 11]]
    batch = _batch([{"greedy": True, "repetition_penalty": penalty}] * 3, history=history, vocab=vocab,
                   max_top_n=vocab)
    ours = _full_logprobs(logits, batch)
    processor = RepetitionPenaltyLogitsProcessor(penalty=penalty)
    for row, ids in enumerate(history):
        reference = processor(torch.tensor([ids]), logits[row:row + 1].clone())
        torch.testing.assert_close(ours[row:row + 1], torch.log_softmax(reference, -1))


def test_frequency_penalty_subtracts_penalty_times_share_of_the_history():
    """TGI's HeterogeneousFrequencyPenaltyLogitsProcessor: logit -= penalty * count / len(history),
    with each row's own length (TGI's for a request alone); padding is not counted."""
    vocab = 6
    logits = _logits(2, vocab, seed=9)
    history = [[0, 0, 0, 4], [5]]
    batch = _batch([{"greedy": True, "frequency_penalty": 0.5}, {"greedy": True, "frequency_penalty": -1.0}],
                   history=history, vocab=vocab, max_top_n=vocab)
    shares = torch.tensor([[3 / 4, 0, 0, 0, 1 / 4, 0], [0, 0, 0, 0, 0, 1 / 1]], dtype=torch.float32)
    expected = logits - torch.tensor([[0.5], [-1.0]]) * shares
    torch.testing.assert_close(_full_logprobs(logits, batch), torch.log_softmax(expected, -1))


def test_repetition_then_frequency_penalty():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    batch = _batch([{"greedy": True, "repetition_penalty": 2.0, "frequency_penalty": 0.5}],
                   history=[[0, 0, 2]], vocab=3, max_top_n=3)
    expected = torch.tensor([[2.0 / 2 - 0.5 * 2 / 3, 0.0, -1.0 * 2 - 0.5 * 1 / 3]])
    torch.testing.assert_close(_full_logprobs(logits, batch), torch.log_softmax(expected, -1))


def test_penalty_can_change_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    batch = _batch([{"greedy": True, "repetition_penalty": 2.0}], history=[[0]], vocab=3)
    assert sample(logits, batch).next_ids.item() == 1


# --- allowed-token mask ----------------------------------------------------------------------------------

def _with_mask(batch: SamplingBatch, allowed: torch.Tensor, rows: list[int] | None = None) -> SamplingBatch:
    """Mask `rows` of the batch (None: all) with the bool [len(rows), vocab] `allowed`, packed as the runner does."""
    batch.allowed_bits = pack_allowed(allowed)
    batch.allowed_rows = None if rows is None else torch.tensor(rows, dtype=torch.int64)
    return batch


def test_masked_rows_draw_only_allowed_ids_and_unmasked_rows_are_unaffected():
    """Rows 0 (greedy) and 1 (sampled) allow 5 ids that are not their argmax; rows 2 (greedy) and 3
    (sampled) allow everything. Over 200 seeds the masked rows only ever give allowed ids, the greedy
    masked row gives the argmax among them (reference: argmax over the allowed columns), and the
    unmasked rows equal the same batch without a mask, token and logprob."""
    vocab = 64
    logits = _logits(4, vocab, seed=3)
    allowed = torch.ones(4, vocab, dtype=torch.bool)
    allowed_ids = [(int(logits[r].argmax()) + 7 * i + 1) % vocab for r in range(2) for i in range(5)]
    allowed[:2] = False
    for r in range(2):
        allowed[r, allowed_ids[5 * r:5 * r + 5]] = True
    for seed in range(200):
        rows = [{"greedy": True}, {"seed": seed, "temperature": 1.5}, {"greedy": True},
                {"seed": seed, "temperature": 1.5}]
        masked = sample(logits, _with_mask(_batch(rows), allowed))
        only_masked_rows = sample(logits, _with_mask(_batch(rows), allowed[:2], rows=[0, 1]))
        plain = sample(logits, _batch(rows))
        assert torch.equal(only_masked_rows.next_ids, masked.next_ids)
        assert torch.equal(only_masked_rows.logprobs, masked.logprobs)
        for r in range(2):
            assert int(masked.next_ids[r]) in allowed_ids[5 * r:5 * r + 5]
        ids = allowed_ids[:5]
        assert int(masked.next_ids[0]) == ids[int(logits[0, ids].argmax())]
        assert torch.equal(masked.next_ids[2:], plain.next_ids[2:])
        assert torch.equal(masked.logprobs[2:], plain.logprobs[2:])


def test_masked_draws_follow_the_renormalised_distribution():
    """Sampled under a mask of 3 ids, frequencies match softmax over those ids (chi-square, 3000 seeds)."""
    vocab = 32
    logits = _logits(1, vocab, seed=5, scale=1.0)
    ids = [2, 9, 20]
    allowed = torch.zeros(1, vocab, dtype=torch.bool)
    allowed[0, ids] = True
    num_draws = 3000
    rows = [{"seed": s} for s in range(num_draws)]
    batch = _with_mask(_batch(rows), allowed.expand(num_draws, -1))
    drawn = sample(logits.expand(num_draws, -1).contiguous(), batch).next_ids
    counts = torch.bincount(drawn, minlength=vocab).double()
    assert counts[ids].sum() == num_draws
    expected = logits[0, ids].softmax(-1).double() * num_draws
    chi2 = float(((counts[ids] - expected) ** 2 / expected).sum())
    assert chi2 < 13.8  # p = 0.001 with 2 degrees of freedom


# --- top-n tokens --------------------------------------------------------------------------------------

def test_top_n_tokens_are_sorted_and_hold_the_greedy_choice():
    logits = _logits(5, 50, seed=10)
    out = sample(logits, _batch([_GREEDY] * 5, max_top_n=4))
    assert out.top_ids.shape == out.top_logprobs.shape == (5, 4)
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()
    assert torch.equal(out.top_ids[:, 0], out.next_ids)
    assert torch.equal(out.top_ids.sort(-1).values, logits.topk(4, -1).indices.sort(-1).values)
    torch.testing.assert_close(out.top_logprobs, torch.log_softmax(logits, -1).gather(1, out.top_ids))
    torch.testing.assert_close(out.top_logprobs[:, 0], out.logprobs)


def test_top_n_contains_a_sampled_choice_inside_top_k():
    logits = _logits(1, 50, seed=11, scale=0.5)
    out = sample(logits.expand(20, -1).contiguous(), _batch([{"seed": s, "top_k": 3} for s in range(20)], max_top_n=3))
    for row in range(20):
        assert out.next_ids[row] in out.top_ids[row]
    assert math.isclose(out.top_logprobs[0].exp().sum().item(), 1.0, rel_tol=1e-5)


@pytest.mark.parametrize("vocab", [151936, 1000, 7])
def test_argmax_rows_is_torch_max_including_ties(vocab):
    generator = torch.Generator().manual_seed(vocab)
    x = torch.randn(6, vocab, generator=generator)
    x[1, :] = 0.0  # all tied: the first index
    x[2, vocab // 2] = x[2, vocab - 1] = 100.0  # tie between slices: the earlier one
    x[3, 0] = float("-inf")
    x[4, :] = float("-inf")  # nothing finite: index 0, as torch.max
    assert torch.equal(argmax_rows(x), x.max(dim=-1).indices)


def test_a_greedy_token_is_first_among_top_tokens_that_tie_with_it():
    """bf16 logits tie exactly (two ids 0.0 apart, seen on SmolLM2): argmax takes the lowest id, and the
    top tokens list equal logprobs by ascending id, so the greedy token is always the first of them."""
    logits = torch.full((3, 600), -4.0)
    logits[0, [260, 253, 7]] = torch.tensor([2.0, 2.0, 1.0])
    logits[1, [511, 42, 300, 99]] = 3.0  # four-way tie
    logits[2, 5] = 1.0
    out = sample(logits, _batch([_GREEDY] * 3, max_top_n=5))
    assert out.next_ids.tolist() == [253, 42, 5]
    assert out.top_ids[:, 0].tolist() == out.next_ids.tolist()
    assert out.top_ids[0, :3].tolist() == [253, 260, 7] and out.top_ids[1, :4].tolist() == [42, 99, 300, 511]
    assert torch.equal(out.top_logprobs, out.top_logprobs.sort(dim=-1, descending=True).values)
    assert torch.equal(out.top_logprobs, torch.log_softmax(logits, -1).gather(1, out.top_ids))
