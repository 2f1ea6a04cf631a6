"""GGUF's Q8_0 / Q4_0 / Q4_1 blocks in the common affine form, against `gguf.quants.dequantize` (the
`gguf` package's own numpy dequantizers, llama.cpp's reference layout) on random blocks: blocks its
quantizer wrote from random weights, and raw random bytes (every code, any scale and min)."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tgserve.core.layers.linear import Linear, LinearMethod
from tgserve.core.quantization.gguf import AFFINE_TYPES, GgufLinearMethod, blocks_to_affine, is_kept_quantized
from tgserve.core.quantization.quant_config import QuantizationError, resolve_quantization
from tgserve.core.quantization.weight_only import AffineQuantizedWeight

TYPES = sorted(AFFINE_TYPES)


def oracle(raw: np.ndarray, tensor_type: str) -> torch.Tensor:
    """raw uint8 [out, bytes per row] -> float32 [out, in], by the gguf package."""
    return torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[tensor_type]).copy())


def as_blocks(raw: np.ndarray, tensor_type: str) -> torch.Tensor:
    return torch.from_numpy(raw.copy()).reshape(raw.shape[0], -1, AFFINE_TYPES[tensor_type][1])


def dequantized(raw: np.ndarray, tensor_type: str) -> torch.Tensor:
    q, scales, zeros = blocks_to_affine(as_blocks(raw, tensor_type), tensor_type)
    bits = AFFINE_TYPES[tensor_type][0]
    assert q.dtype == torch.uint8 and int(q.max()) < 2**bits
    return AffineQuantizedWeight(q, scales, zeros, bits, 32, None, None).dequantize()


def quantized_by_gguf(tensor_type: str, seed: int) -> np.ndarray:
    """Random weights [6, 128] quantized by gguf; row 2's first block constant (Q4_1: d == 0), row 3's zero."""
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((6, 128)).astype(np.float32) * rng.uniform(0.01, 3.0, (6, 1)).astype(np.float32)
    weights[2, :32] = 0.75
    weights[3, 32:64] = 0.0
    return gguf.quants.quantize(weights, gguf.GGMLQuantizationType[tensor_type])


def random_bytes(tensor_type: str, seed: int) -> np.ndarray:
    """Raw random blocks [5, 4 blocks]: any codes; finite float16 d (and m), some d exactly 0."""
    rng = np.random.default_rng(seed)
    block_bytes = AFFINE_TYPES[tensor_type][1]
    blocks = rng.integers(0, 256, (5, 4, block_bytes), dtype=np.uint8)
    scales = rng.standard_normal((5, 4, 2)).astype(np.float16)
    scales[0, 1, 0] = 0.0
    scales[4, :, 0] = 0.0
    num_halves = 1 if tensor_type != "Q4_1" else 2
    blocks[..., :2 * num_halves] = scales[..., :num_halves].copy().view(np.uint8).reshape(5, 4, -1)
    return blocks.reshape(5, -1)


@pytest.mark.parametrize("tensor_type", TYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_blocks_written_by_gguf_dequantize_as_gguf_does(tensor_type, seed):
    raw = quantized_by_gguf(tensor_type, seed)
    torch.testing.assert_close(dequantized(raw, tensor_type), oracle(raw, tensor_type), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tensor_type", TYPES)
@pytest.mark.parametrize("seed", [2, 3])
def test_random_bytes_dequantize_as_gguf_does(tensor_type, seed):
    raw = random_bytes(tensor_type, seed)
    expected = oracle(raw, tensor_type)
    torch.testing.assert_close(dequantized(raw, tensor_type), expected, rtol=1e-5, atol=1e-5)
    if tensor_type == "Q4_1":  # a block with d == 0 is its min m everywhere, whatever the codes say
        assert (expected[4, :32] == expected[4, 0]).all() and expected[4, 0] != 0


def test_nibble_order_low_nibbles_are_the_first_16_inputs():
    block = np.zeros((1, 18), dtype=np.uint8)
    block[0, :2] = np.array([1.0], dtype=np.float16).view(np.uint8)
    block[0, 2] = 0x3A  # input 0: code 0xA, input 16: code 0x3
    q, scales, zeros = blocks_to_affine(as_blocks(block, "Q4_0"), "Q4_0")
    assert q[0, 0] == 0xA and q[0, 16] == 0x3 and zeros[0, 0] == 8 and scales[0, 0] == 1.0


def config(tensor_types: dict[str, str]):
    return resolve_quantization(None, {"quantization_config": {
        "quant_method": "gguf", "bits": 4, "group_size": 32, "file_type": "MOSTLY_Q4_1", "tensor_types": tensor_types}})


@pytest.mark.parametrize("tensor_type", TYPES)
def test_a_layer_multiplies_by_the_dequantized_weight_and_keeps_integers(tensor_type):
    raw = quantized_by_gguf(tensor_type, 4)
    method = GgufLinearMethod(config({"fc": tensor_type}), torch.float32, dense=LinearMethod())
    layer = Linear(128, [6], True, method, torch.float32, torch.device("cpu"), prefixes=("fc",))
    bias = torch.randn(6)
    layer.load(0, "blocks", as_blocks(raw, tensor_type))
    layer.load(0, "bias", bias)
    layer.finalize()
    x = torch.randn(3, 128)
    torch.testing.assert_close(layer(x), F.linear(x, oracle(raw, tensor_type), bias), rtol=1e-5, atol=1e-5)
    _, (affine, _) = layer.prepared
    assert affine.q.dtype == torch.uint8 and affine.bits == AFFINE_TYPES[tensor_type][0] and affine.group_size == 32
    assert f"{tensor_type} x1 linear, int{affine.bits} reference kernel" in method.describe_loaded()


def test_fused_parts_of_different_types_and_k_quants_go_to_the_dense_method():
    dense = LinearMethod()
    method = GgufLinearMethod(config({"q": "Q4_0", "k": "Q4_0", "v": "Q8_0", "o": "Q4_K", "u": "Q4_1"}),
                              torch.float32, dense=dense)
    assert method.method_for(("q", "k", "v")) is dense and method.method_for(("o",)) is dense
    assert method.method_for(("q", "k")).tensor_type == "Q4_0" and method.method_for(("u",)).tensor_type == "Q4_1"
    assert is_kept_quantized(["Q8_0"]) and not is_kept_quantized(["Q6_K"]) and not is_kept_quantized(["F16"])
    assert "Q4_K x1 linear, dequantized to float32" in method.describe_loaded()


def test_quantize_flag_with_a_gguf_model_is_refused_naming_the_file_type():
    with pytest.raises(QuantizationError, match=r"`--quantize eetq` does not apply to a GGUF model, whose tensors "
                                                r"are already quantized \(MOSTLY_Q4_1\); drop the flag"):
        resolve_quantization("eetq", {"quantization_config": {"quant_method": "gguf", "file_type": "MOSTLY_Q4_1",
                                                              "tensor_types": {}}})
    assert config({}).as_info() == {"method": "gguf", "bits": 4, "group_size": 32, "is_prequantized": True,
                                    "description": "gguf 4-bit, group size 32"}
