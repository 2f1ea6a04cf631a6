"""In bfloat16, the engine's next-token logprobs stay close to transformers' on the same checkpoint.

Exact equality is not expected in bf16 (different matmul kernels round differently), so the first
generated position's top-5 logprobs are compared with a tolerance, through the real engine.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


from .engine_harness import request, run_all, running_engine

PROMPTS = ["The lighthouse stands on a rock", "Q: What is the capital of France?\nA:", "今天天气很好"]
TOLERANCE = 0.1  # nats; bf16 keeps ~3 significant digits, logits here span ~20


@pytest.fixture(scope="module")
def engine(demo_model_dir):
    with running_engine(demo_model_dir, dtype="bfloat16", max_batch_total_tokens=1024, max_total_tokens=256,
                        max_batch_prefill_tokens=256) as engine:
        yield engine


def test_first_token_logprobs_close_to_transformers_bf16(engine, demo_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(demo_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(demo_model_dir), dtype=torch.bfloat16).eval()
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        (got,) = run_all(engine, [_top_n_request(ids)])
        with torch.inference_mode():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        reference = torch.log_softmax(logits, dim=-1)
        top = got.events[0]
        assert top.id == int(reference.argmax()) or abs(reference[top.id] - reference.max()) < TOLERANCE
        for alternative in top.top_tokens:
            assert abs(alternative.logprob - float(reference[alternative.id])) < TOLERANCE, (prompt, alternative)
        assert len(top.top_tokens) == 5


def _top_n_request(ids):
    req = request(ids, 1)
    req.top_n_tokens = 5
    return req
