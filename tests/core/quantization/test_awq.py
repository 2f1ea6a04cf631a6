"""AWQ GEMM loading: tensors written by the test's own AutoAWQ-layout writer (tests/core/quantization/
awq_writer.py) load into a Linear whose output equals F.linear on the writer's dequantized weight, across
group sizes, zero points, fused parts and biases; float layers stay float; bad configs and tensors fail
by name."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tgserve.core.layers.linear import Linear, LinearLoadError, LinearMethod
from tgserve.core.quantization.awq import AwqLinearMethod, unpack_awq_words
from tgserve.core.quantization.quant_config import QuantizationError, resolve_quantization

from .awq_writer import awq_quantize, pack_columns, quantization_config


def awq_method(group_size: int, zero_point: bool = True, version: str = "gemm", bits: int = 4,
               extra: dict | None = None) -> AwqLinearMethod:
    section = {**quantization_config(group_size, zero_point, version), "bits": bits, **(extra or {})}
    quantization = resolve_quantization(None, {"quantization_config": section})
    return AwqLinearMethod(quantization, torch.float32, dense=LinearMethod())


def test_unpacking_follows_awqs_interleaved_nibble_order():
    word = sum(value << (4 * nibble) for nibble, value in enumerate([10, 12, 14, 9, 11, 13, 15, 8]))
    packed = torch.tensor([[word - 2**32]], dtype=torch.int32)  # high nibble set: negative as int32
    # nibble j holds column [0, 2, 4, 6, 1, 3, 5, 7][j]: columns 0..7 are nibbles 0, 4, 1, 5, 2, 6, 3, 7
    assert unpack_awq_words(packed).tolist() == [[10, 11, 12, 13, 14, 15, 9, 8]]
    codes = torch.randint(0, 16, (3, 24))
    assert torch.equal(unpack_awq_words(pack_columns(codes)), codes.to(torch.uint8))


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("zero_point", [True, False])
def test_fused_layer_computes_the_writers_dequantized_weight(group_size, zero_point):
    torch.manual_seed(group_size + zero_point)
    in_features, output_sizes = 256, [64, 32, 32]
    parts = [torch.randn(size, in_features) for size in output_sizes]
    written = [awq_quantize(part, group_size, zero_point) for part in parts]
    bias = torch.randn(sum(output_sizes))
    layer = Linear(in_features, output_sizes, True, awq_method(group_size, zero_point), torch.float32,
                   torch.device("cpu"), prefixes=("m.q_proj", "m.k_proj", "m.v_proj"))
    for part, tensors in enumerate(written):
        for name, tensor in tensors.as_checkpoint("").items():
            layer.load(part, name, tensor)
        layer.load(part, "bias", bias.split(output_sizes)[part])
    layer.finalize()
    x = torch.randn(5, in_features)
    expected = F.linear(x, torch.cat([tensors.dequantized for tensors in written]), bias)
    assert torch.allclose(layer(x), expected, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(layer(x), F.linear(x, torch.cat(parts), bias), atol=1e-3)  # it is quantized


def test_symmetric_checkpoint_without_qzeros_uses_zero_eight():
    weight = torch.randn(16, 64)
    written = awq_quantize(weight, 32, zero_point=False, write_zeros=False)
    layer = Linear(64, [16], False, awq_method(32, zero_point=False), torch.float32, torch.device("cpu"))
    for name, tensor in written.as_checkpoint("").items():
        layer.load(0, name, tensor)
    layer.finalize()
    x = torch.randn(3, 64)
    assert torch.allclose(layer(x), F.linear(x, written.dequantized), atol=1e-5)


def test_lm_head_and_modules_to_not_convert_stay_float():
    method = awq_method(32, extra={"modules_to_not_convert": ["down_proj"]})
    assert method.method_for(("lm_head",)) is method.dense
    assert method.method_for(("model.layers.0.mlp.down_proj",)) is method.dense
    assert method.method_for(("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")) is method


@pytest.mark.parametrize("version", ["gemv", "exllama", "GEMV_fast"])
def test_other_versions_are_refused_by_name(version):
    with pytest.raises(QuantizationError, match=f"awq: version '{version}'.*only AutoAWQ's GEMM"):
        awq_method(128, version=version)


def test_other_bits_are_refused():
    with pytest.raises(QuantizationError, match="awq: bits 8"):
        awq_method(128, bits=8)


def test_a_tensor_contradicting_the_group_size_fails_naming_it():
    written = awq_quantize(torch.randn(16, 128), 64, zero_point=True)  # written with groups of 64
    layer = Linear(128, [16], False, awq_method(32), torch.float32, torch.device("cpu"),
                   prefixes=("model.layers.3.mlp.up_proj",))
    layer.load(0, "qweight", written.qweight)
    with pytest.raises(LinearLoadError, match=r"model\.layers\.3\.mlp\.up_proj\.qzeros has shape \(2, 2\)"):
        layer.load(0, "qzeros", written.qzeros)
