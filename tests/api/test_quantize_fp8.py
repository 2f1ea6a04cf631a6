"""fp8 over HTTP. Pre-quantized e4m3 checkpoints this test writes from the demo model (auto-detected from
config.json, no flag): one with per-tensor scales on the attention layers (so the fused q/k/v parts
carry different scales) plus `input_scale`, and per-channel scales on the MLP; one with block-wise
`weight_scale_inv` in 48 x 48 blocks (every demo dimension leaves a ragged last block). And
`--quantize fp8` on the float demo model. Each serves greedy ids equal to transformers' float32 ids
on a copy whose linear weights are the test's own dequantization (fp8 value x its scale)."""
from __future__ import annotations

import json
import math
import shutil

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from .conftest import TEST_SERVER_FLAGS, server_factory
from .quantized_oracle import LINEAR_NAMES, assert_serves_like_transformers, dequantized_copy

BLOCK = 48


def to_fp8(values: torch.Tensor) -> torch.Tensor:
    return values.clamp(-448, 448).to(torch.float8_e4m3fn)


def quantize_tensor(weight: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, weight_scale): per tensor a 0-d scale, per channel [out, 1]."""
    absmax = weight.abs().amax(dim=1, keepdim=True) if per_channel else weight.abs().amax()
    scale = absmax / 448
    return to_fp8(weight / scale), scale.float()


def quantize_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, weight_scale_inv [ceil(out / 48), ceil(in / 48)]), one absmax / 448 per block."""
    rows, cols = math.ceil(weight.shape[0] / BLOCK), math.ceil(weight.shape[1] / BLOCK)
    scale = torch.empty(rows, cols)
    quantized = torch.empty_like(weight)
    for r in range(rows):
        for c in range(cols):
            block = weight[r * BLOCK:(r + 1) * BLOCK, c * BLOCK:(c + 1) * BLOCK]
            scale[r, c] = block.abs().max() / 448
            quantized[r * BLOCK:(r + 1) * BLOCK, c * BLOCK:(c + 1) * BLOCK] = block / scale[r, c]
    return to_fp8(quantized), scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor, row_block: int, col_block: int) -> torch.Tensor:
    """The test's own dequantization: W[r, c] = fp8 value x scale[r // row_block, c // col_block] (a 0-d
    per-tensor scale applies to every value)."""
    values = weight.double()
    if scale.dim() == 0:
        return values * scale.double()
    rows = torch.arange(values.shape[0]) // row_block
    cols = torch.arange(values.shape[1]) // col_block
    return values * scale.double()[rows][:, cols]


def write_fp8_checkpoint(model_dir, out_dir, block: bool) -> dict[str, torch.Tensor]:
    """`model_dir` as a pre-quantized fp8 checkpoint in `out_dir` (lm_head stays float); returns each
    quantized `*.weight`'s dequantized value."""
    shutil.copytree(model_dir, out_dir)
    tensors = load_file(out_dir / "model.safetensors")
    dequantized = {}
    for name in list(tensors):
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
        if not name.endswith(".weight") or module not in LINEAR_NAMES or module == "lm_head":
            continue
        prefix = name[:-len(".weight")]
        if block:
            weight, scale = quantize_blocks(tensors[name])
            tensors[prefix + ".weight_scale_inv"] = scale
            dequantized[name] = dequantize(weight, scale, BLOCK, BLOCK)
        else:
            weight, scale = quantize_tensor(tensors[name], per_channel=".mlp." in name)
            tensors[prefix + ".weight_scale"] = scale
            if ".self_attn." in name:
                tensors[prefix + ".input_scale"] = torch.tensor(0.02)  # static activation scale: ignored
            dequantized[name] = dequantize(weight, scale, 1, weight.shape[1])
        tensors[name] = weight
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out_dir / "config.json").read_text())
    config["quantization_config"] = ({"quant_method": "fp8", "activation_scheme": "dynamic",
                                      "weight_block_size": [BLOCK, BLOCK]} if block
                                     else {"quant_method": "fp8", "activation_scheme": "static"})
    (out_dir / "config.json").write_text(json.dumps(config))
    return dequantized


@pytest.fixture(scope="module")
def start_checkpoint(tmp_path_factory):
    with server_factory(tmp_path_factory, *TEST_SERVER_FLAGS) as start:
        yield start


@pytest.mark.parametrize("block, description", [
    (False, "fp8 8-bit"),
    (True, "fp8 8-bit, group size 48"),
])
def test_prequantized_checkpoint_is_detected_and_serves_like_its_dequantization(
        block, description, start_checkpoint, model_dir, hf_tokenizer, tmp_path_factory):
    work = tmp_path_factory.mktemp("fp8-block" if block else "fp8-tensor")
    dequantized = write_fp8_checkpoint(model_dir, work / "fp8", block)
    assert len(dequantized) == 7 * json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    reference_dir = dequantized_copy(model_dir, work / "dequantized",
                                     lambda name, w: dequantized.get(name, w.double()).float())
    server = start_checkpoint(work / "fp8")
    assert_serves_like_transformers(server.url, reference_dir, model_dir, hf_tokenizer)
    assert f"weights quantized with {description}" in server.log()
    info = httpx.get(f"{server.url}/info", timeout=10).json()["quantization"]
    assert info == {"method": "fp8", "bits": 8, "group_size": BLOCK if block else None, "is_prequantized": True,
                    "description": description}


def round_trip_per_channel(name: str, w: torch.Tensor) -> torch.Tensor:
    if name.startswith("lm_head"):  # kept float at load
        return w
    weight, scale = quantize_tensor(w, per_channel=True)
    return dequantize(weight, scale, 1, weight.shape[1]).float()


def test_quantize_fp8_at_load_serves_like_its_dequantization(start_server, model_dir, hf_tokenizer, tmp_path_factory):
    server = start_server("--quantize", "fp8")
    reference_dir = dequantized_copy(model_dir, tmp_path_factory.mktemp("fp8-at-load") / "dequantized",
                                     round_trip_per_channel)
    assert_serves_like_transformers(server.url, reference_dir, model_dir, hf_tokenizer)
    description = "fp8 8-bit, per output channel (quantized at load, lm_head float)"
    assert f"weights quantized with {description}" in server.log()
    info = httpx.get(f"{server.url}/info", timeout=10).json()["quantization"]
    assert info == {"method": "fp8", "bits": 8, "group_size": -1, "is_prequantized": False, "description": description}


@pytest.mark.parametrize("method", ["bitsandbytes", "bitsandbytes-fp4"])
def test_other_bitsandbytes_methods_are_refused_naming_the_supported_ones(run_cli, method):
    done = run_cli("serve", "--quantize", method, "--backend", "cpu", timeout_s=60)
    assert done.returncode != 0
    assert f"`--quantize {method}` is TGI's method tgserve does not implement; supported: " in done.stderr
    supported = done.stderr.split("supported: ")[1].splitlines()[0]
    assert {"bitsandbytes-nf4", "eetq", "fp8"} <= {name.strip() for name in supported.split(",")}


def test_a_flag_contradicting_the_fp8_checkpoint_fails_at_start(run_cli, model_dir, tmp_path):
    write_fp8_checkpoint(model_dir, tmp_path / "fp8", block=False)
    done = run_cli("serve", "--model-id", str(tmp_path / "fp8"), "--quantize", "bitsandbytes-nf4", "--backend", "cpu",
                   timeout_s=120)
    assert done.returncode != 0 and "`--quantize bitsandbytes-nf4` contradicts the checkpoint" in done.stderr
