"""Greedy output equals Hugging Face transformers `generate` on the same checkpoint, in float32.

Prompts of different lengths go through the real engine one at a time and all at once, with a
small step budget so that long prompts are chunked and prefill and decode share steps.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tgserve.core.config import ServerConfig
from tgserve.core.engine_builder import build_engine
from tgserve.core.plugins import BackendRegistry

from .engine_harness import request, run_all

PROMPTS = [
    "The river ran",
    "Once upon a time there was a small garden behind the old house, and every morning",
    "A",
    "Numbers: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23",
    "今天天气很好 🌞 and the sun",
]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def engine(demo_model_dir):
    config = ServerConfig(model_id=str(demo_model_dir), dtype="float32", max_batch_prefill_tokens=24,
                          max_batch_total_tokens=2048, max_total_tokens=512)
    engine = build_engine(config, BackendRegistry().select("cpu"), progress=False)
    engine.start()
    yield engine
    engine.shutdown(drain_timeout_s=5)


@pytest.fixture(scope="module")
def reference(demo_model_dir):
    """transformers' greedy continuation (ids) of every prompt."""
    tokenizer = AutoTokenizer.from_pretrained(str(demo_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(demo_model_dir), dtype=torch.float32).eval()
    out = {}
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            generated = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                       pad_token_id=tokenizer.pad_token_id)
        out[prompt] = (ids[0].tolist(), generated[0, ids.shape[1]:].tolist())
    return out


def _expected(reference, prompt, eos_ids):
    """transformers ran without eos; the engine stops at the first eos, inclusive."""
    ids = reference[prompt][1]
    for i, token in enumerate(ids):
        if token in eos_ids:
            return ids[:i + 1]
    return ids


def test_greedy_one_at_a_time_matches_transformers(engine, reference):
    for prompt in PROMPTS:
        (got,) = run_all(engine, [request(reference[prompt][0], NEW_TOKENS)])
        assert got.ids == _expected(reference, prompt, engine.tokenizer.eos_token_ids), prompt


def test_greedy_all_at_once_matches_transformers(engine, reference):
    requests = [request(reference[p][0], NEW_TOKENS) for p in PROMPTS * 2]
    results = run_all(engine, requests)
    for prompt, got in zip(PROMPTS * 2, results):
        assert got.ids == _expected(reference, prompt, engine.tokenizer.eos_token_ids), prompt


def test_blocks_are_all_free_after_requests(engine, reference):
    run_all(engine, [request(reference[p][0], NEW_TOKENS) for p in PROMPTS])
    blocks = engine.scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_usable_blocks
