"""Greedy output equals Hugging Face transformers `generate` on the same checkpoint, in float32.

Prompts of different lengths go through the real engine one at a time and all at once, with a
small step budget so that long prompts are chunked and prefill and decode share steps.
"""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


from .engine_harness import request, run_all, running_engine

PROMPTS = [
    "The river ran",
    "Once upon a time there was a small garden behind the old house, and every morning",
    "A",
    "Numbers: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23",
    "今天天气很好 🌞 and the sun",
]
NEW_TOKENS = 16


def _as_llama(demo_dir, out_dir, is_tied: bool):
    """The trained demo weights as a Llama checkpoint (q/k/v biases on), with Llama 3.1 rope scaling.

    Qwen2 is Llama plus q/k/v biases, so the same tensors make a valid Llama model whose greedy
    output is text, not near-ties; the llama3 rope_type and (optionally) tied embeddings exercise
    the code paths Qwen2 checkpoints do not.
    """
    for path in demo_dir.iterdir():
        if path.name != "model.safetensors":
            shutil.copy(path, out_dir / path.name)
    config = json.loads((demo_dir / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=True, mlp_bias=False,
                  tie_word_embeddings=is_tied,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    tensors = load_file(str(demo_dir / "model.safetensors"))
    if is_tied:
        del tensors["lm_head.weight"]
    save_file(tensors, str(out_dir / "model.safetensors"))
    return out_dir


@pytest.fixture(scope="module", params=["qwen2", "llama", "llama-tied"])
def model_dir(request, demo_model_dir, tmp_path_factory):
    if request.param == "qwen2":
        return demo_model_dir
    return _as_llama(demo_model_dir, tmp_path_factory.mktemp(request.param), request.param == "llama-tied")


@pytest.fixture(scope="module")
def engine(model_dir):
    with running_engine(model_dir, dtype="float32", max_batch_prefill_tokens=24, max_batch_total_tokens=2048,
                        max_total_tokens=512) as engine:
        yield engine


@pytest.fixture(scope="module")
def reference(model_dir):
    """transformers' greedy continuation (ids) of every prompt."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    assert type(model).__name__ == json.loads((model_dir / "config.json").read_text())["architectures"][0]
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
