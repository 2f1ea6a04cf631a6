"""`tgserve serve` on AWQ GEMM checkpoints over HTTP: the demo checkpoint's linear layers (lm_head kept
float) written here by the test's own AutoAWQ-layout writer (tests/core/quantization/awq_writer.py, round to
nearest, AutoAWQ's interleaved packing), served detected from config.json alone (zero points, groups of
32) and with `--quantize awq` (no zero points, one group per output channel, no qzeros written). Oracle:
transformers float32 on the demo checkpoint with those weights replaced by the writer's dequantization.
Bad input (the flag on a float checkpoint, a tensor contradicting the config) fails at start with one line."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import httpx
import pytest
import torch

from tests.api.conftest import TEST_SERVER_FLAGS, server_factory
from tests.core.quantization.awq_writer import awq_quantize, quantization_config

from .quantized_oracle import assert_serves_like_transformers, dequantized_copy, write_quantized_copy

# (group size, zero_point): the demo's intermediate size, 352, is 11 groups of 32
KINDS = {"detected": (32, True), "flag": (-1, False)}


def write_awq_checkpoint(model_dir: Path, out_dir: Path, group_size: int, zero_point: bool
                         ) -> tuple[Path, dict[str, torch.Tensor]]:
    """`model_dir` as an AWQ checkpoint in `out_dir`, and each replaced `*.weight`'s dequantized value."""
    def quantize(module_name: str, weight: torch.Tensor):
        if module_name == "lm_head":
            return None
        return awq_quantize(weight, group_size, zero_point, write_zeros=zero_point)

    return write_quantized_copy(model_dir, out_dir, quantize, "quantization_config",
                                quantization_config(group_size, zero_point))


@pytest.fixture(scope="module")
def checkpoints(model_dir, tmp_path_factory):
    """kind -> (AWQ dir, its transformers reference dir)."""
    made = {}
    for kind, (group_size, zero_point) in KINDS.items():
        root = tmp_path_factory.mktemp(f"awq-{kind}")
        awq_dir, dequantized = write_awq_checkpoint(model_dir, root / "awq", group_size, zero_point)
        reference_dir = dequantized_copy(model_dir, root / "reference",
                                         lambda name, weight: dequantized.get(name, weight))  # lm_head: float
        made[kind] = awq_dir, reference_dir
    return made


@pytest.fixture(scope="module")
def servers(checkpoints, tmp_path_factory):
    with server_factory(tmp_path_factory, *TEST_SERVER_FLAGS) as start:
        yield {"detected": start(checkpoints["detected"][0]),
               "flag": start(checkpoints["flag"][0], "--quantize", "awq")}


@pytest.mark.parametrize("kind, description", [("detected", "awq 4-bit, group size 32"),
                                               ("flag", "awq 4-bit, per output channel")])
def test_awq_serves_like_transformers_on_the_dequantized_checkpoint(kind, description, servers, checkpoints,
                                                                     model_dir, hf_tokenizer):
    assert json.loads((model_dir / "config.json").read_text())["tie_word_embeddings"] is False  # lm_head float
    assert_serves_like_transformers(servers[kind].url, checkpoints[kind][1], model_dir, hf_tokenizer)
    assert f"weights quantized with {description}" in servers[kind].log()


def test_info_names_the_quantization(servers):
    info = httpx.get(f"{servers['detected'].url}/info", timeout=10).json()
    assert info["quantization"] == {"method": "awq", "bits": 4, "group_size": 32, "is_prequantized": True,
                                    "description": "awq 4-bit, group size 32"}


def test_awq_flag_on_a_float_checkpoint_fails_at_start_with_one_line(run_cli, model_dir):
    done = run_cli("serve", "--model-id", str(model_dir), "--quantize", "awq", "--backend", "cpu", timeout_s=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert ("tgserve: error: Cannot load `awq` weight, make sure the model is already quantized"
            in done.stderr.splitlines()[-1])


def test_a_tensor_contradicting_the_configs_group_size_fails_at_start_naming_it(run_cli, checkpoints, tmp_path):
    awq_dir = shutil.copytree(checkpoints["detected"][0], tmp_path / "awq")
    config = json.loads((awq_dir / "config.json").read_text())
    config["quantization_config"]["group_size"] = 16  # the tensors hold groups of 32: half as many
    (awq_dir / "config.json").write_text(json.dumps(config))
    done = run_cli("serve", "--model-id", str(awq_dir), "--backend", "cpu", timeout_s=180)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    last = done.stderr.splitlines()[-1]
    match = re.fullmatch(r"tgserve: error: checkpoint tensor (model\.layers\.\d+\.\w+\.\w+)\.(qzeros|scales) has "
                         r"shape \((\d+), (\d+)\) but awq 4-bit, group size 16 expects \((\d+), \4\): it does not fit",
                         last)
    assert match, last
    assert int(match[5]) == 2 * int(match[3])


def test_a_gemv_checkpoint_is_refused_at_start_by_name(run_cli, checkpoints, tmp_path):
    awq_dir = shutil.copytree(checkpoints["detected"][0], tmp_path / "awq")
    config = json.loads((awq_dir / "config.json").read_text())
    config["quantization_config"]["version"] = "gemv"
    (awq_dir / "config.json").write_text(json.dumps(config))
    done = run_cli("serve", "--model-id", str(awq_dir), "--backend", "cpu", timeout_s=180)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "tgserve: error: awq: version 'gemv'" in done.stderr.splitlines()[-1]
