"""Sampled output under speculation keeps the model's distribution: a statistical test.

A small-vocabulary case on the demo model: temperature 2 and top_k 3, so every position draws from
three tokens, and three new tokens per request, so the joint outcome has 27 cells. The second token
is verified against a guess (the greedy continuation, right most of the time); the third is then
the bonus token of the verification row, or comes from the next step when the guess was wrong. The
expected distribution is computed independently, with transformers in float32 (softmax of logits / 2
over the top 3). 1,500 requests with seeds 0..1499 (deterministic: the test never flakes, and a change
that skews the distribution fails it) go through the engine; Pearson's chi-square over the cells
(rare ones pooled) must not reject at 0.1%, and must reject the same sample against the distribution
at temperature 1.5 (so the test can tell a skew of that size).
"""
from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from tgserve.core.request import GenerationRequest, SamplingParams, StoppingParams
from tgserve.core.speculation.acceptance import Proposer

from ..engine_harness import run_all, running_engine

PROMPT = "The cat sat on the"
TEMPERATURE = 2.0
TOP_K = 3
NUM_REQUESTS = 1500
MIN_EXPECTED = 5.0  # cells expected fewer times than this are pooled (the chi-square approximation's rule)
SIGNIFICANCE = 1e-3


class GreedyGuess(Proposer):
    """After the first generated token, proposes the greedy next token (looked up in a table)."""

    def __init__(self, guesses: dict[tuple[int, ...], int]):
        self.guesses = guesses

    def propose(self, seq, max_tokens):
        guess = self.guesses.get(tuple(seq.token_ids[seq.num_prompt_tokens:]))
        return [] if guess is None else [guess]


def _top_k_distribution(model, ids: list[int], temperature: float = TEMPERATURE) -> dict[int, float]:
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, -1].double() / temperature
    values, tokens = torch.softmax(logits, dim=-1).topk(TOP_K)
    return dict(zip(tokens.tolist(), (values / values.sum()).tolist()))


def _joint_distribution(model, prompt: list[int], temperature: float = TEMPERATURE
                        ) -> tuple[dict[tuple[int, ...], float], dict[tuple[int, ...], int]]:
    """P(t1, t2, t3) over the top-k tree, and the greedy guess for t2 after each t1."""
    joint, guesses = {}, {}
    for t1, p1 in _top_k_distribution(model, prompt, temperature).items():
        second = _top_k_distribution(model, prompt + [t1], temperature)
        guesses[(t1,)] = max(second, key=second.get)
        for t2, p2 in second.items():
            for t3, p3 in _top_k_distribution(model, prompt + [t1, t2], temperature).items():
                joint[(t1, t2, t3)] = p1 * p2 * p3
    return joint, guesses


def _chi_square_p_value(counts: dict, expected_share: dict, total: int) -> tuple[float, int]:
    """Pearson's test, cells expected fewer than MIN_EXPECTED times pooled into one; (p-value, dof)."""
    observed, expected = [], []
    pooled_observed = pooled_expected = 0.0
    for cell, share in expected_share.items():
        if share * total < MIN_EXPECTED:
            pooled_observed += counts.get(cell, 0)
            pooled_expected += share * total
        else:
            observed.append(counts.get(cell, 0))
            expected.append(share * total)
    if pooled_expected > 0:
        observed.append(pooled_observed)
        expected.append(pooled_expected)
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    dof = len(observed) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                            torch.tensor(statistic / 2, dtype=torch.float64)))
    return p_value, dof


@pytest.fixture(scope="module")
def engine(demo_model_dir):
    with running_engine(demo_model_dir, dtype="float32", max_batch_total_tokens=16384, speculate=1) as engine:
        yield engine


def test_sampled_output_keeps_the_distribution(engine, demo_model_dir):
    model = AutoModelForCausalLM.from_pretrained(str(demo_model_dir), dtype=torch.float32).eval()
    prompt = engine.tokenizer.encode(PROMPT)
    joint, guesses = _joint_distribution(model, prompt)
    assert sum(joint.values()) == pytest.approx(1.0)
    engine.proposer = GreedyGuess(guesses)
    requests = [GenerationRequest(list(prompt), SamplingParams(do_sample=True, temperature=TEMPERATURE, top_k=TOP_K,
                                                               seed=seed),
                                  StoppingParams(max_new_tokens=3, ignore_eos_token=True))
                for seed in range(NUM_REQUESTS)]
    results = run_all(engine, requests, timeout_s=600)
    outcomes = [tuple(got.ids) for got in results]
    assert set(outcomes) <= set(joint), "a token outside the top-k was sampled"
    # The guesses were verified, and right often enough that bonus tokens make up much of the sample.
    num_accepted = sum(1 for got in results if any(e.num_step_tokens == 2 for e in got.events))
    assert num_accepted > NUM_REQUESTS // 4
    counts = {cell: n for cell, n in ((c, sum(1 for _ in g)) for c, g in itertools.groupby(sorted(outcomes)))}
    p_value, dof = _chi_square_p_value(counts, joint, NUM_REQUESTS)
    assert dof >= 4
    assert p_value > SIGNIFICANCE, f"chi-square rejects the model's distribution (p = {p_value:.2e}, dof {dof})"
    # The test has the power to tell: the same sample is rejected against a nearby wrong distribution
    # (temperature 1.5 instead of 2, the same 27 cells).
    wrong, _ = _joint_distribution(model, prompt, temperature=1.5)
    assert _chi_square_p_value(counts, wrong, NUM_REQUESTS)[0] < SIGNIFICANCE
