"""`tgserve serve --quantize eetq` over HTTP: greedy token ids equal transformers' float32 greedy ids on
a copy of the demo checkpoint whose linear weights were quantized and dequantized here, independently of
tgserve (per output channel, absmax / 127, round half to even). TGI's names tgserve does not implement
are refused at start with one line naming what is supported."""
from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

LINEAR_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
                   "up_proj.weight", "down_proj.weight", "lm_head.weight")
PROMPTS = ["The lighthouse stands on a rock", "Bread is made from four simple things:"]


def dequantized_copy(model_dir, out_dir):
    """The checkpoint with every linear weight replaced by its int8 per-channel round trip (float32)."""
    shutil.copytree(model_dir, out_dir)
    tensors = load_file(out_dir / "model.safetensors")
    for name, tensor in tensors.items():
        if name.endswith(LINEAR_SUFFIXES):
            w = tensor.float()
            absmax = w.abs().amax(dim=1, keepdim=True)
            scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
            tensors[name] = (torch.round(w / scale).clamp(-127, 127) * scale).to(tensor.dtype)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    assert json.loads((out_dir / "config.json").read_text())["tie_word_embeddings"] is False  # lm_head is its own
    return out_dir


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--quantize", "eetq", "--dtype", "float32")


def test_eetq_greedy_ids_equal_transformers_on_the_dequantized_checkpoint(server, model_dir, hf_tokenizer,
                                                                         tmp_path_factory):
    reference_dir = dequantized_copy(model_dir, tmp_path_factory.mktemp("eetq") / "dequantized")
    model = AutoModelForCausalLM.from_pretrained(str(reference_dir), dtype=torch.float32).eval()
    unquantized = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    for prompt in PROMPTS:
        ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 16, "details": True}}
        details = httpx.post(f"{server.url}/generate", json=body, timeout=60).json()["details"]
        assert [token["id"] for token in details["tokens"]] == expected, prompt
        # Logprobs tell int8 weights from float ones even where the greedy path is the same.
        full = torch.tensor([ids[0].tolist() + expected])
        got = torch.tensor([token["logprob"] for token in details["tokens"]], dtype=torch.float64)
        assert (got - _logprobs(model, full, ids.shape[1])).abs().max() < 1e-4, prompt
        assert (got - _logprobs(unquantized, full, ids.shape[1])).abs().max() > 1e-3, prompt  # the test can tell
    assert "weights quantized with eetq" in server.log()


def _logprobs(model, full_ids: torch.Tensor, num_prompt: int) -> torch.Tensor:
    """log p(token | before) of every token after the prompt, in float64."""
    with torch.no_grad():
        logits = model(full_ids).logits[0, num_prompt - 1:-1].double()
    return torch.log_softmax(logits, dim=-1).gather(1, full_ids[0, num_prompt:, None]).squeeze(1)


@pytest.mark.parametrize("method, expected", [
    ("exl2", "`--quantize exl2` is TGI's method tgserve does not implement; supported: eetq"),
    ("nope", "invalid choice: 'nope'"),
])
def test_other_methods_are_refused_at_start_with_one_line(run_cli, method, expected):
    done = run_cli("serve", "--quantize", method, "--backend", "cpu", timeout_s=60)
    assert done.returncode != 0 and expected in done.stderr
