"""`--quantize eetq`'s int8 weight-only method against a brute-force per-channel quantizer written here."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tgserve.core.layers.linear import LinearMethod, linear_from_dense
from tgserve.core.quantization.eetq import EetqLinearMethod, quantize_per_channel
from tgserve.core.quantization.quant_config import resolve_quantization


def brute_force_dequantized(weight: torch.Tensor) -> torch.Tensor:
    """Row by row, element by element: q = round-half-even(w / (absmax / 127)), w' = q * scale."""
    rows = []
    for row in weight.tolist():
        absmax = max(abs(v) for v in row)
        scale = torch.tensor(absmax, dtype=torch.float32) / 127 if absmax else torch.tensor(1.0)
        rows.append([max(-127.0, min(127.0, round(float(torch.tensor(v) / scale)))) * float(scale) for v in row])
    return torch.tensor(rows, dtype=torch.float64)


def test_quantized_weight_matches_the_brute_force_and_is_int8():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 40, generator=generator)
    weight[3] = 0.0  # an all-zero channel must not divide by zero
    weight_int8, scales = quantize_per_channel(weight)
    assert weight_int8.dtype == torch.int8 and weight_int8.abs().max() == 127
    torch.testing.assert_close((weight_int8.double() * scales.double()[:, None]), brute_force_dequantized(weight),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_layer_output_is_the_dequantized_weights_matmul(bias):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(24, 32, generator=generator)
    b = torch.randn(24, generator=generator) if bias else None
    x = torch.randn(5, 32, generator=generator)
    method = EetqLinearMethod(resolve_quantization("eetq", {}), torch.float32, dense=LinearMethod())
    layer = linear_from_dense(method, weight, b)
    expected = F.linear(x.double(), brute_force_dequantized(weight), None if b is None else b.double())
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    _, (affine, _) = layer.prepared  # the reference kernel keeps the common affine form
    assert affine.q.dtype == torch.uint8 and affine.bits == 8  # what stays in memory is 8-bit, not a float copy
