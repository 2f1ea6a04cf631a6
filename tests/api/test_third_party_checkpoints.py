"""Checkpoints written by third-party quantizers, served by `tgserve serve` with the method detected from
config.json, answer as transformers float32 does on the tool's own dequantization of the same tensors.

- llm-compressor 0.14 (its own GPTQ, `oneshot`): compressed-tensors pack-quantized 4-bit in groups of 32
  with zero points, and 8-bit symmetric per output channel, both with its static activation ordering
  and lm_head left float. Oracle: the compressed-tensors package's decompressor (llm-compressor writes
  with it).
- GPTQModel 7.7 (its own GPTQ): the Hugging Face GPTQ layout, 4-bit groups of 32, symmetric, `desc_act`
  act-order (g_idx). Oracle: the test's own GPTQ dequantizer (tests/api/test_quantize_cli.py), held
  to GPTQModel's own dequantization by a fingerprint the fixture writer recorded with GPTQModel's
  torch kernel (W @ r per layer, within its float16 rounding).

The fixtures (tests/fixtures/llmcompressor, tests/fixtures/gptqmodel, each written by its write.py in a
virtual environment holding that tool) are what the tool wrote for the demo checkpoint, less the two
embedding matrices, which the test takes from the demo checkpoint built here.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.api.conftest import TEST_SERVER_FLAGS, server_factory

from .quantized_oracle import assert_serves_like_transformers
from .test_quantize_cli import dequantize_gptq

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")
# kind -> (fixture folder, method, bits, /info group size, what /info and the start-up log call it)
KINDS = {"llmc-w4-g32-asym": ("llmcompressor/w4-g32-asym", "compressed-tensors", 4, 32,
                              "compressed-tensors 4-bit, group size 32"),
         "llmc-w8-channel": ("llmcompressor/w8-channel", "compressed-tensors", 8, -1,  # -1: per channel, as GPTQ
                             "compressed-tensors 8-bit, per output channel"),
         "gptqmodel-g32-act": ("gptqmodel/g32-act", "gptq", 4, 32, "gptq 4-bit, group size 32")}


def assemble(model_dir: Path, fixture: Path, out_dir: Path) -> Path:
    """The checkpoint the tool wrote: the demo's files, its config files, its tensors plus the demo's embeddings."""
    shutil.copytree(model_dir, out_dir)
    float_tensors = load_file(model_dir / "model.safetensors")
    tensors = load_file(fixture / "layers.safetensors") | {name: float_tensors[name] for name in EMBEDDINGS}
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    for config in fixture.glob("*config.json"):
        shutil.copy(config, out_dir / config.name)
    return out_dir


def fingerprint_vector(num_inputs: int) -> torch.Tensor:
    """r[i] = 1 + cos(i) / 2, float64 [num_inputs]: positive, so a shifted zero point cannot cancel out."""
    return 1 + torch.cos(torch.arange(num_inputs, dtype=torch.float64)) / 2


def dequantized_gptq_copy(checkpoint: Path, fixture: Path, out_dir: Path) -> Path:
    """`checkpoint` (GPTQ) as float32 weights from the test's dequantizer, after checking them against the
    fingerprint of GPTQModel's own dequantization."""
    config = json.loads((checkpoint / "config.json").read_text())
    quantization = config.pop("quantization_config")
    tensors = load_file(checkpoint / "model.safetensors")
    expected = json.loads((fixture / "dequantized_fingerprint.json").read_text())
    assert len(expected) == 7 * config["num_hidden_layers"]
    for prefix, values in expected.items():
        weight = dequantize_gptq(tensors, prefix, quantization["bits"])
        # GPTQModel dequantizes in float16 (the scales' dtype): measured, each of its weights is within
        # 0.051 of a quantization step of the exact float32 product; a wrong zero point or group is off
        # by whole steps. So W @ r may differ from its fingerprint by at most (steps / 16) @ r.
        r = fingerprint_vector(weight.shape[1])
        steps = tensors[f"{prefix}.scales"].double()[tensors[f"{prefix}.g_idx"].long()].t()  # [out, in]
        error = (weight.double() @ r - torch.tensor(values, dtype=torch.float64)).abs()
        assert (error <= (steps / 16) @ r).all(), prefix
        for part in ("qweight", "qzeros", "scales", "g_idx"):
            del tensors[f"{prefix}.{part}"]
        tensors[f"{prefix}.weight"] = weight.contiguous()
    shutil.copytree(checkpoint, out_dir)
    (out_dir / "quantize_config.json").unlink()
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def decompressed_copy(checkpoint: Path, out_dir: Path) -> Path:
    """`checkpoint` as float32 weights, each quantized layer dequantized by compressed-tensors itself."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    config = json.loads((checkpoint / "config.json").read_text())
    quantization = config.pop("quantization_config")
    assert quantization["format"] == "pack-quantized" and quantization["ignore"] == ["lm_head"]
    scheme = QuantizationScheme(**quantization["config_groups"]["group_0"])
    tensors = load_file(checkpoint / "model.safetensors")
    prefixes = sorted({name[:-len("weight_packed")] for name in tensors if name.endswith(".weight_packed")})
    assert len(prefixes) == 7 * config["num_hidden_layers"]  # q k v o gate up down of every layer
    for prefix in prefixes:
        parts = {name[len(prefix):]: tensors.pop(name) for name in list(tensors) if name.startswith(prefix + "weight")}
        tensors[prefix + "weight"] = PackedQuantizationCompressor.decompress(parts, scheme)["weight"].float()
    shutil.copytree(checkpoint, out_dir)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


@pytest.fixture(scope="module")
def checkpoints(model_dir, tmp_path_factory):
    """kind -> (the tool's checkpoint, its dequantized float copy)."""
    pytest.importorskip("compressed_tensors", reason="needs the compressed-tensors package (the oracle)")
    made = {}
    for kind, (folder, method, *_) in KINDS.items():
        root = tmp_path_factory.mktemp(kind)
        checkpoint = assemble(model_dir, FIXTURES / folder, root / "checkpoint")
        made[kind] = checkpoint, (decompressed_copy(checkpoint, root / "reference") if method == "compressed-tensors"
                                  else dequantized_gptq_copy(checkpoint, FIXTURES / folder, root / "reference"))
    return made


@pytest.fixture(scope="module")
def servers(checkpoints, tmp_path_factory):
    with server_factory(tmp_path_factory, *TEST_SERVER_FLAGS) as start:
        yield {kind: start(checkpoints[kind][0]) for kind in KINDS}


@pytest.mark.parametrize("kind", list(KINDS))
def test_serves_like_transformers_on_the_tools_own_dequantization(kind, servers, checkpoints, model_dir,
                                                                    hf_tokenizer):
    _folder, method, bits, group_size, description = KINDS[kind]
    assert_serves_like_transformers(servers[kind].url, checkpoints[kind][1], model_dir, hf_tokenizer)
    assert f"weights quantized with {description}" in servers[kind].log()
    info = httpx.get(f"{servers[kind].url}/info", timeout=10).json()["quantization"]
    assert (info["method"], info["bits"], info["group_size"], info["is_prequantized"]) == (
        method, bits, group_size, True)
