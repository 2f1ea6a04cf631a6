"""`--quantize` reconciled with the checkpoint's quantization_config, as TGI's `get_loader` does."""
from __future__ import annotations

import pytest
import torch

from tgserve.core.layers.linear import LinearMethod
from tgserve.core.quantization.registry import make_quantized_method
from tgserve.core.quantization.quant_config import QuantizationError, resolve_quantization

GPTQ = {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}}


def test_float_checkpoint_without_flag_is_unquantized():
    assert resolve_quantization(None, {"model_type": "qwen2"}) is None


def test_method_is_detected_from_the_checkpoint():
    quantization = resolve_quantization(None, GPTQ)
    assert (quantization.method, quantization.bits, quantization.group_size) == ("gptq", 4, 128)
    assert quantization.is_prequantized and quantization.describe() == "gptq 4-bit, group size 128"


@pytest.mark.parametrize("quant_method", ["fp8", "fbgemm_fp8"])
def test_fp8_spellings(quant_method):
    assert resolve_quantization(None, {"quantization_config": {"quant_method": quant_method}}).method == "fp8"


def test_compressed_tensors_from_compression_config():
    raw = {"compression_config": {"config_groups": {"group_0": {}}, "format": "pack-quantized"}}
    assert resolve_quantization(None, raw).method == "compressed-tensors"


def test_matching_flag_is_accepted_and_a_contradicting_one_refused():
    assert resolve_quantization("gptq", GPTQ).method == "gptq"
    with pytest.raises(QuantizationError, match=r"`--quantize awq` contradicts the checkpoint, which is quantized "
                                                r"with gptq"):
        resolve_quantization("awq", GPTQ)


@pytest.mark.parametrize("method", ["gptq", "awq", "compressed-tensors"])
def test_prequantized_only_methods_on_a_float_checkpoint(method):
    with pytest.raises(QuantizationError, match=f"Cannot load `{method}` weight, make sure the model is already "
                                                f"quantized"):
        resolve_quantization(method, {"model_type": "llama"})


def test_at_load_method_names_its_layout():
    quantization = resolve_quantization("eetq", {"model_type": "llama"})
    assert not quantization.is_prequantized
    assert quantization.describe() == "eetq 8-bit, per output channel (quantized at load)"


@pytest.mark.parametrize("method, is_head_quantized", [("eetq", True), ("fp8", False), ("bitsandbytes-nf4", False)])
def test_at_load_methods_keep_lm_head_float_but_eetq(method, is_head_quantized):
    """fp8 / NF4 at load leave lm_head (a tied model's embedding matrix) float, as transformers' bitsandbytes
    and llm-compressor do by default: on SmolLM2 it took NF4 from +39% to +25.5% perplexity (BENCHMARKS.md)."""
    quantization = resolve_quantization(method, {"model_type": "llama"})
    dense = LinearMethod()
    quantized = make_quantized_method(quantization, torch.float32, dense)
    assert quantization.is_lm_head_quantized is is_head_quantized
    assert (quantized.method_for(("lm_head",)) is quantized) is is_head_quantized
    assert quantized.method_for(("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")) is quantized
    assert quantization.describe().endswith("(quantized at load)" if is_head_quantized
                                            else "(quantized at load, lm_head float)")


def test_unknown_checkpoint_method_is_named():
    with pytest.raises(QuantizationError, match="quant_method 'hqq'"):
        resolve_quantization(None, {"quantization_config": {"quant_method": "hqq"}})
