"""EETQ-style int8 weight-only linear layers: a float checkpoint quantized once at load.

`--quantize eetq` (TGI's name): each output channel of W [out, in] becomes int8 with one scale,
scale = absmax / 127, so W ~= q * scale[:, None]. Activations stay in the run dtype. This is the
core's reference: correct on every device, the matmul in torch (`F.linear` on q in the run dtype,
then the per-channel scale on the output, which equals scaling the weight). Backends add fast
kernels that keep q packed; the weight bytes held in memory are already int8 here. Every linear
layer is quantized, lm_head included.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tgserve.core.layers.linear import LinearMethod


class Int8WeightOnlyLinearMethod(LinearMethod):
    """Loads a dense float weight (+ bias) like the reference method, then keeps int8 + scales."""

    name = "eetq"

    def prepare(self, params: dict[str, torch.Tensor]) -> object:
        weight, bias = params["weight"], params.get("bias")
        weight_int8, scales = quantize_per_channel(weight)
        return weight_int8, scales.to(weight.dtype), bias

    def apply(self, prepared: object, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] -> [..., out_features]."""
        weight_int8, scales, bias = prepared
        y = F.linear(x, weight_int8.to(x.dtype)) * scales
        return y if bias is None else y + bias


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] float -> (int8 [out, in], float32 scales [out]); an all-zero row gets scale 1."""
    absmax = weight.detach().float().abs().amax(dim=1)
    scales = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    weight_int8 = torch.round(weight.float() / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return weight_int8, scales
