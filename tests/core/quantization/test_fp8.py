"""fp8 (e4m3) weight-only linears against a dequantization written here from the published layouts:
per-tensor and per-channel `weight_scale`, block-wise `weight_scale_inv` (ragged last blocks), fused
parts with different scales, and `--quantize fp8` at load checked against an e4m3 rounding written
from the format's definition (3 mantissa bits, exponent bias 7, subnormals below 2**-6, max 448)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tgserve.core.layers.linear import Linear, LinearLoadError, LinearMethod, Parallel
from tgserve.core.quantization.fp8 import Fp8LinearMethod
from tgserve.core.quantization.quant_config import QuantizationError, resolve_quantization

CPU = torch.device("cpu")


def checkpoint_config(**extra) -> dict:
    return {"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic", **extra}}


def random_fp8(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    return (torch.randn(rows, cols, generator=generator) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)


def dequantize_blocks(weight: torch.Tensor, scale: torch.Tensor, block_rows: int, block_cols: int) -> torch.Tensor:
    """Element by element: W[r, c] = weight[r, c] * scale[r // block_rows, c // block_cols] (float64)."""
    values = weight.double()
    out = torch.empty_like(values)
    for r in range(values.shape[0]):
        for c in range(values.shape[1]):
            out[r, c] = values[r, c] * float(scale[r // block_rows, c // block_cols])
    return out


def fused_layer(in_features: int, sizes: list[int], quantization, bias: bool = False) -> Linear:
    method = Fp8LinearMethod(quantization, torch.float32, dense=LinearMethod())
    names = tuple(f"model.layers.0.self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj")[:len(sizes)])
    return Linear(in_features, sizes, bias, method, torch.float32, CPU, prefixes=names)


def run_layer(layer: Linear, x: torch.Tensor) -> torch.Tensor:
    layer.finalize()
    return layer(x).double()


@pytest.mark.parametrize("scale_shape", [(), (1,)])
def test_fused_parts_with_their_own_per_tensor_scales(scale_shape):
    generator = torch.Generator().manual_seed(0)
    sizes, in_features = [8, 4, 4], 24
    layer = fused_layer(in_features, sizes, resolve_quantization(None, checkpoint_config()), bias=True)
    weights = [random_fp8(size, in_features, generator) for size in sizes]
    scales = [torch.tensor(0.01).reshape(scale_shape), torch.tensor(0.5).reshape(scale_shape),
              torch.tensor(3.0).reshape(scale_shape)]
    biases = [torch.randn(size, generator=generator) for size in sizes]
    for part, (weight, scale, bias) in enumerate(zip(weights, scales, biases)):
        layer.load(part, "weight", weight)
        layer.load(part, "weight_scale", scale)
        layer.load(part, "input_scale", torch.tensor(7.0 + part))  # W8A16: read and ignored
        layer.load(part, "bias", bias)
    x = torch.randn(3, in_features, generator=generator)
    expected_weight = torch.cat([weight.double() * float(scale) for weight, scale in zip(weights, scales)])
    expected = F.linear(x.double(), expected_weight, torch.cat(biases).double())
    torch.testing.assert_close(run_layer(layer, x), expected, rtol=1e-5, atol=1e-4)
    assert layer.prepared.weight.dtype == torch.float8_e4m3fn  # one byte per weight stays in memory


@pytest.mark.parametrize("per_row_shape", ["[out, 1]", "[out]"])
def test_per_channel_scales(per_row_shape):
    generator = torch.Generator().manual_seed(1)
    sizes, in_features = [6, 10], 16
    layer = fused_layer(in_features, sizes, resolve_quantization(None, {"quantization_config": {
        "quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}}))
    weights = [random_fp8(size, in_features, generator) for size in sizes]
    scales = [torch.rand(size, 1, generator=generator) + 0.01 for size in sizes]
    for part, (weight, scale) in enumerate(zip(weights, scales)):
        layer.load(part, "weight", weight)
        layer.load(part, "weight_scale", scale if per_row_shape == "[out, 1]" else scale[:, 0])
    x = torch.randn(2, in_features, generator=generator)
    expected_weight = torch.cat([dequantize_blocks(w, s, 1, in_features) for w, s in zip(weights, scales)])
    torch.testing.assert_close(run_layer(layer, x), F.linear(x.double(), expected_weight), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("block", [(4, 8), (16, 16)])
def test_block_scales_with_ragged_last_blocks(block):
    generator = torch.Generator().manual_seed(2)
    sizes, in_features = [10, 6, 6], 20  # 10 and 6 outputs, 20 inputs: ragged in both dims for (4, 8)
    layer = fused_layer(in_features, sizes, resolve_quantization(None, checkpoint_config(
        weight_block_size=list(block))))
    weights = [random_fp8(size, in_features, generator) for size in sizes]
    scales = [torch.rand(math.ceil(size / block[0]), math.ceil(in_features / block[1]), generator=generator) + 0.01
              for size in sizes]
    for part, (weight, scale) in enumerate(zip(weights, scales)):
        layer.load(part, "weight", weight)
        layer.load(part, "weight_scale_inv", scale)
    x = torch.randn(3, in_features, generator=generator)
    expected_weight = torch.cat([dequantize_blocks(w, s, *block) for w, s in zip(weights, scales)])
    torch.testing.assert_close(run_layer(layer, x), F.linear(x.double(), expected_weight), rtol=1e-5, atol=1e-4)


def test_block_scale_of_the_wrong_shape_names_the_tensor():
    layer = fused_layer(20, [10], resolve_quantization(None, checkpoint_config(weight_block_size=[4, 8])))
    with pytest.raises(LinearLoadError, match="weight_scale_inv part 0"):
        layer.load(0, "weight_scale_inv", torch.ones(2, 3))  # 10 outputs in blocks of 4 need 3 rows


def test_a_layer_loaded_without_its_scale_is_an_error():
    layer = fused_layer(8, [4, 4], resolve_quantization(None, checkpoint_config()))
    for part in range(2):
        layer.load(part, "weight", torch.ones(4, 8).to(torch.float8_e4m3fn))
    layer.load(0, "weight_scale", torch.tensor(1.0))
    with pytest.raises(QuantizationError, match="no weight_scale"):
        layer.finalize()


def test_checkpoint_float_layers_stay_float():
    quantization = resolve_quantization(None, checkpoint_config(modules_to_not_convert=["o_proj"],
                                                                ignored_layers=["model.layers.1.mlp.down_proj"]))
    dense = LinearMethod()
    method = Fp8LinearMethod(quantization, torch.float32, dense=dense)
    assert method.method_for(("lm_head",)) is dense
    assert method.method_for(("model.layers.0.self_attn.o_proj",)) is dense
    assert method.method_for(("model.layers.1.mlp.down_proj",)) is dense
    assert method.method_for(("model.layers.0.mlp.down_proj",)) is method


def round_to_e4m3(values: torch.Tensor) -> torch.Tensor:
    """Round-half-even to e4m3fn (values already within +-448): 3 mantissa bits, exponents from -6,
    below 2**-6 subnormal steps of 2**-9."""
    values = values.double()
    exponent = torch.floor(torch.log2(values.abs().clamp(min=2.0 ** -6)))
    step = torch.pow(2.0, exponent - 3)
    return torch.round(values / step) * step


def test_quantize_at_load_per_output_channel():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(12, 40, generator=generator)
    weight[5] = 0.0  # an all-zero channel gets scale 1, not a division by zero
    weight[7, 3] = 1e-6  # scales to below half of e4m3's smallest subnormal: 0
    weight[7, 4] = weight[7].abs().max() * 0.011 / 448  # scales to 0.011: a subnormal (5.6 steps of 2**-9)
    quantization = resolve_quantization("fp8", {})
    assert (quantization.bits, quantization.group_size, quantization.is_prequantized) == (8, -1, False)
    assert quantization.describe() == "fp8 8-bit, per output channel (quantized at load, lm_head float)"
    up = ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")
    layer = Linear(40, [5, 7], False, Fp8LinearMethod(quantization, torch.float32, dense=LinearMethod()),
                   torch.float32, CPU, prefixes=up)
    layer.load(0, "weight", weight[:5])
    layer.load(1, "weight", weight[5:])
    absmax = weight.double().abs().amax(dim=1, keepdim=True)
    scale = torch.where(absmax > 0, absmax / 448, torch.ones_like(absmax))
    expected_weight = round_to_e4m3((weight.double() / scale).clamp(-448, 448)) * scale
    x = torch.randn(4, 40, generator=generator)
    torch.testing.assert_close(run_layer(layer, x), F.linear(x.double(), expected_weight), rtol=1e-5, atol=1e-5)
    stored = layer.prepared
    assert stored.weight.dtype == torch.float8_e4m3fn and stored.weight.float().abs().amax(dim=1)[0] == 448
    torch.testing.assert_close(stored.dequantize().double(), expected_weight, rtol=1e-6, atol=1e-7)


def test_checkpoint_detection_names_bits_and_block():
    block = resolve_quantization("fp8", checkpoint_config(weight_block_size=[128, 128]))
    assert (block.method, block.bits, block.group_size, block.is_prequantized) == ("fp8", 8, 128, True)
    fbgemm = resolve_quantization(None, {"quantization_config": {"quant_method": "fbgemm_fp8"}})
    assert (fbgemm.method, fbgemm.bits) == ("fp8", 8)
    with pytest.raises(QuantizationError, match="contradicts"):
        resolve_quantization("bitsandbytes-nf4", checkpoint_config())


@pytest.mark.parametrize("parallel", [Parallel.COLUMN, Parallel.ROW])
def test_block_scales_split_over_tensor_parallel_ranks(parallel):
    """Each rank's slice of a fused fp8 layer dequantizes to its slice of the whole layer's weight."""
    generator = torch.Generator().manual_seed(4)
    sizes, in_features, block = [8, 12], 32, (4, 8)
    weights = [random_fp8(size, in_features, generator) for size in sizes]
    scales = [torch.rand(math.ceil(size / block[0]), in_features // block[1], generator=generator) + 0.01
              for size in sizes]
    whole = [dequantize_blocks(w, s, *block) for w, s in zip(weights, scales)]
    quantization = resolve_quantization(None, checkpoint_config(weight_block_size=list(block)))
    for rank in range(2):
        layer = Linear(in_features, sizes, False, Fp8LinearMethod(quantization, torch.float32, dense=LinearMethod()),
                       torch.float32, CPU, parallel=parallel, rank=rank, world_size=2)
        for part, (weight, scale) in enumerate(zip(weights, scales)):
            layer.load(part, "weight", weight)
            layer.load(part, "weight_scale_inv", scale)
        layer.finalize()
        if parallel is Parallel.COLUMN:
            expected = torch.cat([w[rank * (w.shape[0] // 2):(rank + 1) * (w.shape[0] // 2)] for w in whole])
        else:
            expected = torch.cat(whole)[:, rank * in_features // 2:(rank + 1) * in_features // 2]
        torch.testing.assert_close(layer.prepared.dequantize().double(), expected, rtol=1e-6, atol=1e-6)


def test_an_fp8_format_other_than_e4m3_is_refused():
    with pytest.raises(QuantizationError, match="fmt 'e5m2'"):
        fused_layer(8, [4], resolve_quantization(None, checkpoint_config(fmt="e5m2")))
