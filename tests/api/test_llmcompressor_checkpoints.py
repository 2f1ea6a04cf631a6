"""Checkpoints written by a third-party quantizer, llm-compressor 0.14 (its own GPTQ, `oneshot`), served by
`tgserve serve` with the method detected from config.json: 4-bit in groups of 32 with zero points, and
8-bit symmetric per output channel, both with its static activation ordering and lm_head left float.

The fixtures (tests/fixtures/llmcompressor, written by its write.py in a virtual environment holding
llm-compressor) are what llm-compressor wrote for the demo checkpoint, less the two embedding matrices,
which the test takes from the demo checkpoint built here. Oracle: the tool's own dequantization, the
compressed-tensors package's decompressor (llm-compressor writes with it), applied to the same tensors;
transformers runs that float copy in float32.
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

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "llmcompressor"
EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")
# fixture -> (bits, /info group size, what /info and the start-up log call it)
KINDS = {"w4-g32-asym": (4, 32, "compressed-tensors 4-bit, group size 32"),
         "w8-channel": (8, -1, "compressed-tensors 8-bit, per output channel")}  # -1: per channel, as GPTQ


def assemble(model_dir: Path, fixture: Path, out_dir: Path) -> Path:
    """The checkpoint llm-compressor wrote: the demo's files, its config.json, its tensors plus the demo's embeddings."""
    shutil.copytree(model_dir, out_dir)
    float_tensors = load_file(model_dir / "model.safetensors")
    tensors = load_file(fixture / "layers.safetensors") | {name: float_tensors[name] for name in EMBEDDINGS}
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(fixture / "config.json", out_dir / "config.json")
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
    """kind -> (the llm-compressor checkpoint, its decompressed float copy)."""
    pytest.importorskip("compressed_tensors", reason="needs the compressed-tensors package (the oracle)")
    made = {}
    for kind in KINDS:
        root = tmp_path_factory.mktemp(f"llmc-{kind}")
        checkpoint = assemble(model_dir, FIXTURES / kind, root / "checkpoint")
        made[kind] = checkpoint, decompressed_copy(checkpoint, root / "reference")
    return made


@pytest.fixture(scope="module")
def servers(checkpoints, tmp_path_factory):
    with server_factory(tmp_path_factory, *TEST_SERVER_FLAGS) as start:
        yield {kind: start(checkpoints[kind][0]) for kind in KINDS}


@pytest.mark.parametrize("kind", list(KINDS))
def test_serves_like_transformers_on_the_tools_own_dequantization(kind, servers, checkpoints, model_dir,
                                                                    hf_tokenizer):
    bits, group_size, description = KINDS[kind]
    assert_serves_like_transformers(servers[kind].url, checkpoints[kind][1], model_dir, hf_tokenizer)
    assert f"weights quantized with {description}" in servers[kind].log()
    info = httpx.get(f"{servers[kind].url}/info", timeout=10).json()["quantization"]
    assert (info["method"], info["bits"], info["group_size"], info["is_prequantized"]) == (
        "compressed-tensors", bits, group_size, True)
