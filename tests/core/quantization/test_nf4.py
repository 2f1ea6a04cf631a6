"""`--quantize bitsandbytes-nf4` against bitsandbytes itself (its CPU quantize_4bit / dequantize_4bit, the
oracle where it installs) and against an NF4 quantizer written here from the published layout: the
code table rebuilt from QLoRA's construction, absmax per block of 64 flattened weights, nearest code,
high nibble first."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tgserve.core.layers.linear import Linear, LinearMethod, linear_from_dense
from tgserve.core.quantization.nf4 import Nf4LinearMethod, dequantize_nf4, quantize_nf4
from tgserve.core.quantization.quant_config import resolve_quantization



def qlora_nf4_table() -> list[float]:
    """QLoRA's (arXiv 2305.14314, sec. 3) NF4: 8 positive and 7 negative quantiles of N(0, 1), evenly
    spaced in probability from offset = 1 - (1/30 + 1/32) / 2 to 1/2, plus an exact 0, scaled to [-1, 1];
    rounded to float32 as a table in memory is."""
    offset = 1 - 0.5 * (1 / 30 + 1 / 32)
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (values / values.abs().max()).float().tolist()


QLORA_NF4 = qlora_nf4_table()
# 37, 9 and 96: blocks straddle rows; 37 and 9: a ragged last block and an odd count
SHAPES = [(8, 128), (5, 37), (3, 64), (7, 9), (4, 96), (1, 1)]


def brute_force_nf4(weight: torch.Tensor, block_size: int = 64) -> tuple[list[int], list[float], torch.Tensor]:
    """Value by value: (packed bytes, block absmax, dequantized weight float64)."""
    values = weight.reshape(-1).tolist()
    codes, absmaxes, dequantized = [], [], []
    for start in range(0, len(values), block_size):
        block = values[start:start + block_size]
        absmax = float(torch.tensor(max(abs(v) for v in block), dtype=torch.float32))
        inverse = float(torch.tensor(1.0, dtype=torch.float32) / max(absmax, 1e-38))  # multiply, as bitsandbytes
        absmaxes.append(absmax)
        for value in block:
            scaled = max(-1.0, min(1.0, float(torch.tensor(value, dtype=torch.float32) * inverse)))
            index = min(range(16), key=lambda i: (abs(scaled - QLORA_NF4[i]), i))
            codes.append(index)
            dequantized.append(float(torch.tensor(QLORA_NF4[index])) * absmax)
    if len(codes) % 2:
        codes.append(7)  # 0.0
    packed = [(codes[i] << 4) | codes[i + 1] for i in range(0, len(codes), 2)]
    return packed, absmaxes, torch.tensor(dequantized, dtype=torch.float64).reshape(weight.shape)


@pytest.mark.parametrize("shape", SHAPES)
def test_quantizer_matches_the_brute_force(shape):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    packed, absmax = quantize_nf4(weight)
    expected_packed, expected_absmax, expected = brute_force_nf4(weight)
    assert packed.dtype == torch.uint8 and packed.tolist() == expected_packed
    assert absmax.tolist() == pytest.approx(expected_absmax, rel=0, abs=0)
    torch.testing.assert_close(dequantize_nf4(packed, absmax, shape).double(), expected, rtol=0,
                               atol=1e-6 * max(expected_absmax))


def test_all_zero_block_maps_to_zero():
    packed, absmax = quantize_nf4(torch.zeros(2, 64))
    assert packed.tolist() == [0x77] * 64 and dequantize_nf4(packed, absmax, (2, 64)).abs().max() == 0


@pytest.mark.parametrize("shape", SHAPES)
def test_bitsandbytes_is_the_oracle(shape):
    functional = pytest.importorskip("bitsandbytes.functional", reason="needs the bitsandbytes package")
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(7 * sum(shape)))
    packed, absmax = quantize_nf4(weight)
    # Flattened, as Params4bit stores it (bitsandbytes 0.50.2's CPU dequantize_4bit of a 2-D weight with
    # rows not whole 64-blocks, as (4, 96), reads blocks per row, disagreeing with its own quantize_4bit).
    bnb_packed, state = functional.quantize_4bit(weight.reshape(-1), blocksize=64, quant_type="nf4",
                                                 compress_statistics=False)
    assert torch.equal(packed, bnb_packed.reshape(-1)) and torch.equal(absmax, state.absmax)
    assert torch.equal(dequantize_nf4(packed, absmax, shape), functional.dequantize_4bit(bnb_packed, state).reshape(shape))
    assert functional.get_4bit_type("nf4", device="cpu").tolist() == pytest.approx(QLORA_NF4, abs=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_layer_output_is_the_dequantized_weights_matmul(bias):
    generator = torch.Generator().manual_seed(11)
    weight = torch.randn(24, 40, generator=generator)
    b = torch.randn(24, generator=generator) if bias else None
    quantization = resolve_quantization("bitsandbytes-nf4", {})
    assert (quantization.bits, quantization.group_size, quantization.is_prequantized) == (4, 64, False)
    assert quantization.describe() == "bitsandbytes-nf4 4-bit, group size 64 (quantized at load, lm_head float)"
    layer = linear_from_dense(Nf4LinearMethod(quantization, torch.float32, dense=LinearMethod()), weight, b)
    x = torch.randn(5, 40, generator=generator)
    _, _, expected_weight = brute_force_nf4(weight)
    expected = F.linear(x.double(), expected_weight, None if b is None else b.double())
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    stored = layer.prepared
    assert stored.packed.dtype == torch.uint8 and stored.packed.numel() == 24 * 40 // 2  # half a byte per weight


def test_fused_parts_quantize_as_one_flattened_weight():
    """Fused gate/up: the layer's [out, in] weight is what gets blocked (parts concatenate row-major)."""
    generator = torch.Generator().manual_seed(12)
    gate, up = torch.randn(6, 20, generator=generator), torch.randn(10, 20, generator=generator)
    method = Nf4LinearMethod(resolve_quantization("bitsandbytes-nf4", {}), torch.float32, dense=LinearMethod())
    layer = Linear(20, [6, 10], False, method, torch.float32, torch.device("cpu"), prefixes=("m.gate_proj", "m.up_proj"))
    layer.load(0, "weight", gate)
    layer.load(1, "weight", up)
    layer.finalize()
    _, _, expected = brute_force_nf4(torch.cat([gate, up]))
    torch.testing.assert_close(layer.prepared.dequantize().double(), expected, rtol=0, atol=1e-5)
