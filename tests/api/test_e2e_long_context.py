"""Long context through `tgserve serve`: the seed's limit flags, a 32k-token request on a YaRN checkpoint,
and TGI's start-up messages when the limits cannot fit.

Prompts are " the" repeated: the demo tokenizer makes exactly one token of each, so a prompt's
length in tokens is known without asking the server.
"""
from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from .conftest import server_factory

SEED_FLAGS = ("--max-batch-prefill-tokens", "4096", "--max-total-tokens", "4096", "--max-input-tokens", "2048")
LONG_TOKENS = 32_000
# Qwen2's model-card YaRN block over 4096 positions: 8 x 4096 = 32768.
YARN = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096}
LONG_FLAGS = ("--dtype", "float32", "--max-total-tokens", "32768", "--max-input-tokens", "32760",
              "--max-batch-prefill-tokens", "4096", "--max-batch-total-tokens", "32768")


def prompt(num_tokens: int) -> str:
    return " the" * num_tokens


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    """Factory: a healthy cpu-backend server on `checkpoint` with exactly `flags`; all stopped at teardown."""
    with server_factory(tmp_path_factory, "--backend", "cpu") as start:
        yield start


@pytest.fixture(scope="module")
def yarn_checkpoint(model_dir, tmp_path_factory):
    """A one-layer random Qwen2 on the demo tokenizer, with YaRN stretching its 4096 positions to 32768.

    Random weights: this checks that 32k positions flow through the server (chunked prefill, rotary
    tables, KV capacity); tests/core/test_long_context.py checks the numbers against transformers.
    One layer of two 16-wide heads keeps the quadratic attention of 32k tokens cheap on two cores.
    """
    out_dir = tmp_path_factory.mktemp("yarn-tiny")
    for path in model_dir.iterdir():
        if path.name not in ("config.json", "model.safetensors"):
            shutil.copy(path, out_dir / path.name)
    demo = json.loads((model_dir / "config.json").read_text())
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(
        vocab_size=demo["vocab_size"], hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096, rope_theta=10000.0,
        tie_word_embeddings=True, bos_token_id=demo["bos_token_id"], eos_token_id=demo["eos_token_id"],
    )).save_pretrained(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    config.pop("rope_parameters")
    config["rope_scaling"] = YARN  # the old key and `type`, as Qwen2's model cards write it
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def test_demo_tokenizer_makes_one_token_per_the(model_dir):
    from transformers import AutoTokenizer
    assert len(AutoTokenizer.from_pretrained(str(model_dir))(prompt(2048)).input_ids) == 2048


def test_seed_example_limits(serve, model_dir):
    server = serve(model_dir, *SEED_FLAGS)
    with httpx.Client(base_url=server.url, timeout=300) as client:
        info = client.get("/info").json()
        assert (info["max_input_tokens"], info["max_total_tokens"]) == (2048, 4096)
        full = client.post("/generate", json={"inputs": prompt(2048), "parameters": {"max_new_tokens": 4}})
        assert full.status_code == 200 and full.json()["generated_text"]
        too_long = client.post("/generate", json={"inputs": prompt(2049), "parameters": {"max_new_tokens": 4}})
        assert too_long.status_code == 422
        assert too_long.json() == {"error": "Input validation error: `inputs` must have less than 2048 tokens. "
                                            "Given: 2049", "error_type": "validation"}
        # TGI checks the budget with at most 1024 new tokens (TGI-CONTRACT.md 2.2): accepted, ends at 4096
        with client.stream("POST", "/generate_stream",
                           json={"inputs": prompt(2047), "parameters": {"max_new_tokens": 2050}}) as too_many:
            assert too_many.status_code == 200
            first = next(line for line in too_many.iter_lines() if line.startswith("data:"))
        assert '"error"' not in first and '"token"' in first
        assert client.get("/health").status_code == 200


def test_a_32k_token_request_on_a_yarn_checkpoint(serve, yarn_checkpoint):
    server = serve(yarn_checkpoint, *LONG_FLAGS)
    assert "RoPE scaling: yarn, factor 8.0 over `original_max_position_embeddings` 4096: 32768 tokens" in server.log()
    body = {"inputs": prompt(LONG_TOKENS), "parameters": {"max_new_tokens": 8, "details": True}}
    with httpx.Client(base_url=server.url, timeout=600) as client:
        assert client.get("/info").json()["max_total_tokens"] == 32768
        with client.stream("POST", "/generate_stream", json=body) as stream:
            events = [json.loads(line[len("data:"):]) for line in stream.iter_lines() if line.startswith("data:")]
        last = events[-1]
        assert "error" not in last, last
        assert last["details"]["input_length"] == LONG_TOKENS
        assert last["details"]["generated_tokens"] == len(events) >= 1
        refused = client.post("/generate", json={"inputs": prompt(32_761), "parameters": {"max_new_tokens": 1}})
        assert refused.status_code == 422 and "must have less than 32760 tokens" in refused.json()["error"]


@pytest.mark.parametrize("flags, message", [
    (("--max-batch-prefill-tokens", "4096", "--max-total-tokens", "4096", "--max-input-tokens", "4096"),
     "`max_input_tokens`(4096) must be < `max_total_tokens`(4096)"),
    (("--max-total-tokens", "4096", "--max-batch-total-tokens", "2048"),
     "`max_total_tokens` must be <= `max_batch_total_tokens`"),
    (("--max-batch-prefill-tokens", "8192", "--max-batch-total-tokens", "4096"),
     "`max_batch_prefill_tokens` must be <= `max_batch_total_tokens`"),
    (("--max-total-tokens", "8192"), "`max_total_tokens`(8192) must be <= 4096, the positions this model covers"),
    (("--rope-scaling", "yarn"), "argument --rope-scaling: invalid choice: 'yarn'"),
    (("--rope-factor", "0.5"), "`--rope-factor` must be a number >= 1.0"),
])
def test_limits_that_cannot_fit_fail_at_start_with_one_line(run_cli, model_dir, flags, message):
    result = run_cli("serve", "--backend", "cpu", "--model-id", str(model_dir), *flags)
    assert result.returncode != 0
    assert message in one_error_line(result.stderr)
