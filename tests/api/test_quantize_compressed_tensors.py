"""`tgserve serve` on compressed-tensors checkpoints over HTTP: the demo checkpoint's linear layers written
here by the test's own llm-compressor-layout writer (tests/core/quantization/compressed_tensors_writer.py,
round to nearest; its bytes are checked against the compressed-tensors package in the core tests), served
detected from config.json alone (pack-quantized W4A16, asymmetric, groups of 32, lm_head ignored) and with
`--quantize compressed-tensors` on a W8A16 one (symmetric, per output channel, lm_head quantized too, under
`compression_config`). Oracle: transformers float32 on the demo checkpoint with those weights replaced by
the writer's dequantization. Bad input fails at start with one line."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import httpx
import pytest
import torch

from tests.api.conftest import TEST_SERVER_FLAGS, server_factory
from tests.core.quantization.compressed_tensors_writer import ct_quantize, quantization_config

from .quantized_oracle import assert_serves_like_transformers, dequantized_copy, write_quantized_copy

# kind -> (bits, strategy, group size, symmetric, ignore, config key)
KINDS = {"w4a16": (4, "group", 32, False, ["lm_head"], "quantization_config"),
         "w8a16": (8, "channel", None, True, [], "compression_config")}


def write_ct_checkpoint(model_dir: Path, out_dir: Path, bits: int, strategy: str, group_size: int | None,
                        symmetric: bool, ignore: list[str], key: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """`model_dir` as a pack-quantized checkpoint in `out_dir`, and each replaced `*.weight`'s dequantized value."""
    def quantize(module_name: str, weight: torch.Tensor):
        if module_name in ignore:
            return None
        return ct_quantize(weight, bits, strategy, group_size, symmetric)

    return write_quantized_copy(model_dir, out_dir, quantize, key,
                                quantization_config(bits, strategy, group_size, symmetric, ignore=ignore))


@pytest.fixture(scope="module")
def checkpoints(model_dir, tmp_path_factory):
    """kind -> (compressed-tensors dir, its transformers reference dir)."""
    made = {}
    for kind, layout in KINDS.items():
        root = tmp_path_factory.mktemp(f"ct-{kind}")
        ct_dir, dequantized = write_ct_checkpoint(model_dir, root / "ct", *layout)
        reference_dir = dequantized_copy(model_dir, root / "reference",
                                         lambda name, weight: dequantized.get(name, weight))
        made[kind] = ct_dir, reference_dir, dequantized
    return made


@pytest.fixture(scope="module")
def servers(checkpoints, tmp_path_factory):
    with server_factory(tmp_path_factory, *TEST_SERVER_FLAGS) as start:
        yield {"w4a16": start(checkpoints["w4a16"][0]),
               "w8a16": start(checkpoints["w8a16"][0], "--quantize", "compressed-tensors")}


@pytest.mark.parametrize("kind, description", [("w4a16", "compressed-tensors 4-bit, group size 32"),
                                               ("w8a16", "compressed-tensors 8-bit, per output channel")])
def test_compressed_tensors_serves_like_transformers_on_the_dequantized_checkpoint(kind, description, servers,
                                                                                    checkpoints, model_dir,
                                                                                    hf_tokenizer):
    assert ("lm_head.weight" in checkpoints[kind][2]) is (kind == "w8a16")  # ignored in one, quantized in the other
    assert_serves_like_transformers(servers[kind].url, checkpoints[kind][1], model_dir, hf_tokenizer)
    assert f"weights quantized with {description}" in servers[kind].log()


def test_info_names_the_quantization(servers):
    info = httpx.get(f"{servers['w4a16'].url}/info", timeout=10).json()
    assert info["quantization"] == {"method": "compressed-tensors", "bits": 4, "group_size": 32,
                                    "is_prequantized": True, "description": "compressed-tensors 4-bit, group size 32"}


def test_flag_on_a_float_checkpoint_fails_at_start_with_one_line(run_cli, model_dir):
    done = run_cli("serve", "--model-id", str(model_dir), "--quantize", "compressed-tensors", "--backend", "cpu",
                   timeout_s=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert ("tgserve: error: Cannot load `compressed-tensors` weight, make sure the model is already quantized"
            in done.stderr.splitlines()[-1])


def test_a_tensor_contradicting_the_configs_bits_fails_at_start_naming_it(run_cli, checkpoints, tmp_path):
    ct_dir = shutil.copytree(checkpoints["w4a16"][0], tmp_path / "ct")
    config = json.loads((ct_dir / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 8  # tensors hold 4-bit
    (ct_dir / "config.json").write_text(json.dumps(config))
    done = run_cli("serve", "--model-id", str(ct_dir), "--backend", "cpu", timeout_s=180)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    last = done.stderr.splitlines()[-1]
    match = re.fullmatch(r"tgserve: error: checkpoint tensor (model\.layers\.\d+\.\w+\.\w+)\.(weight_packed|"
                         r"weight_zero_point) has shape \((\d+), (\d+)\) but compressed-tensors 8-bit, group size 32 "
                         r"expects \((\d+), (\d+)\): it does not fit", last)
    assert match, last


def test_an_fp8_checkpoint_is_refused_at_start_with_one_line(run_cli, checkpoints, tmp_path):
    ct_dir = shutil.copytree(checkpoints["w8a16"][0], tmp_path / "ct")
    config = json.loads((ct_dir / "config.json").read_text())
    config["compression_config"] = quantization_config(8, "channel", None, True, float_weights=True)
    (ct_dir / "config.json").write_text(json.dumps(config))
    done = run_cli("serve", "--model-id", str(ct_dir), "--backend", "cpu", timeout_s=180)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "tgserve: error: compressed-tensors: float (fp8) weights" in done.stderr.splitlines()[-1]
