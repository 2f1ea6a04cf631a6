"""The oracle every quantized-serving test shares: transformers, float32, on a checkpoint whose linear
weights the test replaced by their independently dequantized values.

A quantized server's greedy ids must equal transformers' greedy ids on that float copy, and its
logprobs must sit within `atol` of it while differing from the original float checkpoint's by more
than `min_gap` (so the test can tell quantized weights from float ones).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import httpx
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
PROMPTS = ["The lighthouse stands on a rock", "Bread is made from four simple things:"]


def dequantized_copy(model_dir: Path, out_dir: Path, round_trip: Callable[[str, torch.Tensor], torch.Tensor]
                     ) -> Path:
    """`model_dir` copied to `out_dir` with each linear `*.weight` W replaced by `round_trip(name, W)`
    (the test's own quantize-dequantize, float32), stored in the checkpoint's dtype."""
    shutil.copytree(model_dir, out_dir)
    tensors = load_file(out_dir / "model.safetensors")
    for name, tensor in tensors.items():
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
        if name.endswith(".weight") and module in LINEAR_NAMES:
            tensors[name] = round_trip(name, tensor.float()).to(tensor.dtype)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir


def write_quantized_copy(model_dir: Path, out_dir: Path, quantize: Callable[[str, torch.Tensor], object | None],
                         config_key: str, quantization_config: dict) -> tuple[Path, dict[str, torch.Tensor]]:
    """`model_dir` copied to `out_dir` as a quantized checkpoint, and each replaced `*.weight`'s dequantized value.

    `quantize(module name, W)` returns the test writer's result for a linear layer (an object with
    `as_checkpoint(prefix)` -> its tensors, and `dequantized`), or None to leave that layer float;
    `config.json` gains `config_key: quantization_config`."""
    shutil.copytree(model_dir, out_dir)
    tensors, dequantized = load_file(out_dir / "model.safetensors"), {}
    for name in [name for name in tensors if name.endswith(".weight")]:
        prefix = name[:-len("weight")]
        if prefix.rstrip(".").rsplit(".", 1)[-1] not in LINEAR_NAMES:
            continue
        written = quantize(prefix.rstrip("."), tensors[name])
        if written is not None:
            del tensors[name]
            tensors.update(written.as_checkpoint(prefix))
            dequantized[name] = written.dequantized.float()
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out_dir / "config.json").read_text())
    config[config_key] = quantization_config
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir, dequantized


def assert_serves_like_transformers(server_url: str, reference_dir: Path, float_dir: Path, tokenizer,
                                    prompts: list[str] = PROMPTS, max_new_tokens: int = 16, atol: float = 1e-4,
                                    min_gap: float = 1e-3) -> None:
    """Greedy ids from `server_url`'s /generate equal transformers' on `reference_dir`; logprobs within
    `atol` of those, and further than `min_gap` from `float_dir`'s (the unquantized checkpoint)."""
    model = AutoModelForCausalLM.from_pretrained(str(reference_dir), dtype=torch.float32).eval()
    unquantized = AutoModelForCausalLM.from_pretrained(str(float_dir), dtype=torch.float32).eval()
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
        body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "details": True}}
        details = httpx.post(f"{server_url}/generate", json=body, timeout=120).json()["details"]
        assert [token["id"] for token in details["tokens"]] == expected, prompt
        full = torch.tensor([ids[0].tolist() + expected])
        got = torch.tensor([token["logprob"] for token in details["tokens"]], dtype=torch.float64)
        assert (got - token_logprobs(model, full, ids.shape[1])).abs().max() < atol, prompt
        assert (got - token_logprobs(unquantized, full, ids.shape[1])).abs().max() > min_gap, prompt


def token_logprobs(model, full_ids: torch.Tensor, num_prompt: int) -> torch.Tensor:
    """log p(token | before) of every token after the prompt, in float64."""
    with torch.no_grad():
        logits = model(full_ids).logits[0, num_prompt - 1:-1].double()
    return torch.log_softmax(logits, dim=-1).gather(1, full_ids[0, num_prompt:, None]).squeeze(1)
