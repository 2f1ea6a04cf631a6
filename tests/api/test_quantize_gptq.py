"""`tgserve serve` on GPTQ checkpoints (Hugging Face layout) over HTTP: the demo checkpoint's linear
layers (lm_head kept float) written here as 4-bit group-32 GPTQ by the test's own writer
(tests/core/quantization/gptq_writer.py, round to nearest, packed from the published layout), then
served detected from config.json alone, and with `--quantize gptq` on an act-order copy. Oracle:
transformers float32 on the demo checkpoint with those weights replaced by the writer's dequantization.
Bad input (the flag on a float checkpoint, a tensor contradicting the config) fails at start with one line.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
import torch

from tests.api.conftest import TEST_SERVER_FLAGS, server_factory
from tests.core.quantization.gptq_writer import gptq_quantize, quantization_config

from .quantized_oracle import assert_serves_like_transformers, dequantized_copy, write_quantized_copy

GROUP_SIZE = 32  # the demo's intermediate size, 352, is 11 groups of 32
# modules reading the same input share one act-order input order, as GPTQ's shared Hessian gives them
_INPUT_OF = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 2, "up_proj": 2, "down_proj": 3}


def write_gptq_checkpoint(model_dir: Path, out_dir: Path, act_order: bool, checkpoint_format: str = "gptq",
                          bits: int = 4) -> tuple[Path, dict[str, torch.Tensor]]:
    """`model_dir` as a GPTQ checkpoint in `out_dir`, and each replaced `*.weight`'s dequantized value."""
    def quantize(module_name: str, weight: torch.Tensor):
        module = module_name.rsplit(".", 1)[-1]
        if module == "lm_head":
            return None
        return gptq_quantize(weight, bits, GROUP_SIZE, sym=False, act_order=act_order,
                             version=1 if checkpoint_format == "gptq" else 2,
                             seed=10 * int(module_name.split(".")[2]) + _INPUT_OF[module])

    return write_quantized_copy(model_dir, out_dir, quantize, "quantization_config", quantization_config(
        bits, GROUP_SIZE, sym=False, desc_act=act_order, checkpoint_format=checkpoint_format))


@pytest.fixture(scope="module")
def checkpoints(model_dir, tmp_path_factory):
    """(GPTQ dir, its transformers reference dir) for the in-order v1 checkpoint and the act-order v2 one."""
    made = {}
    for kind, act_order, checkpoint_format in (("in-order", False, "gptq"), ("act-order", True, "gptq_v2")):
        root = tmp_path_factory.mktemp(f"gptq-{kind}")
        gptq_dir, dequantized = write_gptq_checkpoint(model_dir, root / "gptq", act_order, checkpoint_format)
        reference_dir = dequantized_copy(model_dir, root / "reference",
                                         lambda name, weight: dequantized.get(name, weight))  # lm_head: float
        made[kind] = gptq_dir, reference_dir
    return made


@pytest.fixture(scope="module")
def servers(checkpoints, tmp_path_factory):
    with server_factory(tmp_path_factory, *TEST_SERVER_FLAGS) as start:
        yield {"in-order": start(checkpoints["in-order"][0]),  # no flag: detected from config.json
               "act-order": start(checkpoints["act-order"][0], "--quantize", "gptq")}


@pytest.mark.parametrize("kind", ["in-order", "act-order"])
def test_gptq_serves_like_transformers_on_the_dequantized_checkpoint(kind, servers, checkpoints, model_dir,
                                                                      hf_tokenizer):
    assert json.loads((model_dir / "config.json").read_text())["tie_word_embeddings"] is False  # lm_head float
    assert_serves_like_transformers(servers[kind].url, checkpoints[kind][1], model_dir, hf_tokenizer)
    assert "weights quantized with gptq 4-bit, group size 32" in servers[kind].log()


def test_info_names_the_quantization(servers):
    info = httpx.get(f"{servers['in-order'].url}/info", timeout=10).json()
    assert info["quantization"] == {"method": "gptq", "bits": 4, "group_size": 32, "is_prequantized": True,
                                    "description": "gptq 4-bit, group size 32"}


def test_gptq_flag_on_a_float_checkpoint_fails_at_start_with_one_line(run_cli, model_dir):
    done = run_cli("serve", "--model-id", str(model_dir), "--quantize", "gptq", "--backend", "cpu", timeout_s=120)
    assert done.returncode == 1
    assert ("tgserve: error: Cannot load `gptq` weight, make sure the model is already quantized"
            in done.stderr.splitlines()[-1])
    assert "Traceback" not in done.stderr


def test_a_tensor_contradicting_the_configs_bits_fails_at_start_naming_it(run_cli, model_dir, tmp_path):
    gptq_dir, _ = write_gptq_checkpoint(model_dir, tmp_path / "gptq", act_order=False)
    config = json.loads((gptq_dir / "config.json").read_text())
    config["quantization_config"]["bits"] = 8  # the tensors hold 4-bit codes
    (gptq_dir / "config.json").write_text(json.dumps(config))
    done = run_cli("serve", "--model-id", str(gptq_dir), "--backend", "cpu", timeout_s=180)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    last = done.stderr.splitlines()[-1]
    # the first qweight in file order; 4-bit codes of N inputs fill N / 8 words, 8-bit ones N / 4
    match = re.fullmatch(r"tgserve: error: checkpoint tensor (model\.layers\.\d+\.\w+\.\w+)\.qweight has shape "
                         r"\((\d+), (\d+)\) but gptq 8-bit, group size 32 expects \((\d+), (\d+)\): it does not fit",
                         last)
    assert match, last
    assert int(match[4]) == 2 * int(match[2]) and match[3] == match[5]
