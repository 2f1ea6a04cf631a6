"""A backend with static shapes (prefill and decode buckets, fixed batch slots) gets only steps that fit
them, and computes the same greedy tokens as the cpu backend.

The backend is `tests/backends/bucketed_plugin.py`, registered through the plugin manager like any
vendor plugin; its runner and model are the core's, wrapped to write down every step. The oracles are
the constraints the plugin declared (checked here, step by step, with brute-force arithmetic over the
plan), and the cpu backend's greedy tokens for the same prompts, where no step is padded.
"""
from __future__ import annotations

import pytest

from tgserve.core.config import ServerConfig
from tgserve.core.engine_builder import build_engine
from tgserve.core.plugins import BackendRegistry
from tgserve.core.request import GenerationRequest, SamplingParams, StoppingParams

from tests.backends import bucketed_plugin as plugin
from tests.core.engine_harness import run_all, running_engine

LIMITS = {"dtype": "float32", "max_batch_prefill_tokens": 64, "max_batch_total_tokens": 2048,
          "max_total_tokens": 256}
# Six requests for four slots, prompts of 1 to 60 tokens: some are chunked, prefill and decode share steps,
# and the last two wait for a slot.
PROMPT_LENGTHS = [9, 1, 37, 60, 5, 23]
NEW_TOKENS = [6, 12, 5, 4, 9, 7]


def _prompts(vocab_size: int) -> list[list[int]]:
    return [[(7 * i + 13 * j) % (vocab_size - 1) + 1 for j in range(n)] for i, n in enumerate(PROMPT_LENGTHS)]


def _requests(prompts):
    return [GenerationRequest(p, SamplingParams(), StoppingParams(max_new_tokens=n, ignore_eos_token=True))
            for p, n in zip(prompts, NEW_TOKENS)]


@pytest.fixture(scope="module")
def bucketed_run(demo_model_dir):
    """(journal of every step, greedy ids per request) of the prompts on the bucketed backend."""
    backend = BackendRegistry(extra_plugins={plugin.NAME: plugin}).select(plugin.NAME)
    plugin.JOURNAL.clear()
    engine = build_engine(ServerConfig(model_id=str(demo_model_dir), **LIMITS), backend, progress=False)
    engine.start()
    try:
        prompts = _prompts(engine.runner.vocab_size)
        got = run_all(engine, _requests(prompts))
    finally:
        engine.shutdown(drain_timeout_s=5)
    return list(plugin.JOURNAL), [g.ids for g in got], prompts


def test_same_greedy_tokens_as_the_cpu_backend(bucketed_run, demo_model_dir):
    _, bucketed_ids, prompts = bucketed_run
    with running_engine(demo_model_dir, **LIMITS) as engine:
        expected = [g.ids for g in run_all(engine, _requests(prompts))]
    assert bucketed_ids == expected
    assert [len(ids) for ids in bucketed_ids] == NEW_TOKENS


def test_every_step_has_a_bucket_shape(bucketed_run):
    journal, _, _ = bucketed_run
    assert len(journal) > 10  # warmup, chunked prefills, mixed and decode-only steps
    shapes = set()
    for step in journal:
        num_seqs, num_tokens = len(step.query_lens), sum(step.query_lens)
        is_decode_only = all(n == 1 for n in step.query_lens)
        assert step.num_seq_rows == min(b for b in plugin.DECODE_BATCH_BUCKETS if b >= num_seqs)
        if is_decode_only:
            assert step.num_token_rows == step.num_seq_rows
        else:
            assert step.num_token_rows == min(b for b in plugin.PREFILL_TOKEN_BUCKETS if b >= num_tokens)
        # Padding rows write their K/V into block 0 and read only block 0.
        assert len(step.padding_slot_mapping) == step.num_token_rows - num_tokens
        assert all(0 <= slot < 16 for slot in step.padding_slot_mapping)
        assert all(set(row) == {0} for row in step.padding_block_tables)
        # Only each sequence's last `num_sampled` real rows get logits: never a padding row.
        ends = [sum(step.query_lens[:i + 1]) for i in range(num_seqs)]
        assert step.logits_indices == [row for end, k in zip(ends, step.num_sampled) for row in range(end - k, end)]
        shapes.add((step.num_token_rows, step.num_seq_rows, is_decode_only))
    assert len({s for s in shapes if s[2]}) > 1 and len({s for s in shapes if not s[2]}) > 1  # several buckets used


def test_each_request_keeps_one_slot_while_it_runs(bucketed_run):
    journal, _, _ = bucketed_run
    slot_of: dict[int, int] = {}
    for step in journal:
        num_seqs = len(step.request_ids)
        assert step.batch_slots[:num_seqs] == step.plan_slots
        assert all(slot == -1 for slot in step.batch_slots[num_seqs:])
        assert all(0 <= slot < plugin.NUM_SLOTS for slot in step.plan_slots)
        assert len(set(step.plan_slots)) == num_seqs  # no slot held twice at once
        for request_id, slot in zip(step.request_ids, step.plan_slots):
            assert slot_of.setdefault(request_id, slot) == slot
    assert max(len(step.request_ids) for step in journal) == plugin.NUM_SLOTS
    assert len([r for r in slot_of if r >= 0]) == len(PROMPT_LENGTHS)  # the last two got slots others freed


def test_inputs_stay_in_the_same_buffers(bucketed_run):
    journal, _, _ = bucketed_run
    assert len({step.data_ptrs for step in journal}) == 1


# Text that repeats itself, so the n-gram proposer finds guesses (six, for the four slots).
SPECULATION_PROMPTS = ["The river ran past the mill. The river ran past the mill. The river ran",
                       "The cat sat on the mat and the dog sat on the rug.",
                       "The baker is already asleep. The bread for the morning is in the oven. The baker is",
                       "In early spring the garden is still brown and bare. In early spring the garden",
                       "Once upon a time", "The train moves on. The train moves on. The train"]


def test_speculation_fits_the_buckets_and_keeps_the_tokens(demo_model_dir):
    """--speculate 2 on the bucketed backend: verification steps are padded to the prefill buckets, only
    real rows get logits, and the greedy tokens equal the cpu backend's without speculation."""
    with running_engine(demo_model_dir, **LIMITS) as engine:
        prompts = [engine.tokenizer.encode(text) for text in SPECULATION_PROMPTS]
        expected = [g.ids for g in run_all(engine, _requests(prompts))]
    backend = BackendRegistry(extra_plugins={plugin.NAME: plugin}).select(plugin.NAME)
    plugin.JOURNAL.clear()
    engine = build_engine(ServerConfig(model_id=str(demo_model_dir), speculate=2, **LIMITS), backend, progress=False)
    engine.start()
    try:
        got = [g.ids for g in run_all(engine, _requests(prompts))]
    finally:
        engine.shutdown(drain_timeout_s=5)
    assert got == expected
    verifying = [step for step in plugin.JOURNAL if any(k > 1 for k in step.num_sampled)]
    assert verifying, "no step verified a guess"
    for step in verifying:
        num_tokens = sum(step.query_lens)
        assert step.num_token_rows == min(b for b in plugin.PREFILL_TOKEN_BUCKETS if b >= num_tokens)
        ends = [sum(step.query_lens[:i + 1]) for i in range(len(step.query_lens))]
        assert step.logits_indices == [row for end, k in zip(ends, step.num_sampled) for row in range(end - k, end)]
