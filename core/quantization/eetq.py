"""EETQ-style int8 weight-only quantization: a float checkpoint quantized once at load (`--quantize eetq`).

Each output channel of W [out, in] becomes int8 with one scale, scale = absmax / 127, so
W ~= q * scale[:, None]; activations stay in the run dtype; every linear layer is quantized, lm_head
included (quant_config.AT_LOAD_QUANTIZED_HEAD). In the common affine form the codes are q + 128 with
zero point 128 and one group per row.
"""
from __future__ import annotations

import torch

from tgserve.core.quantization.method import QuantizedLinearMethod
from tgserve.core.quantization.weight_only import AffineQuantizedWeight


class EetqLinearMethod(QuantizedLinearMethod):
    """Allocates and loads a dense float weight (+ bias) as the reference method does, then keeps int8
    codes + per-channel scales."""

    name = "eetq"

    def to_affine(self, params: dict[str, torch.Tensor]) -> AffineQuantizedWeight:
        weight = params["weight"]
        weight_int8, scales = quantize_per_channel(weight)
        codes = (weight_int8.to(torch.int16) + 128).to(torch.uint8)
        return AffineQuantizedWeight(q=codes, scales=scales[:, None], zeros=torch.full_like(scales[:, None], 128.0),
                                     bits=8, group_size=weight.shape[1], input_perm=None, bias=params.get("bias"))


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] float -> (int8 [out, in], float32 scales [out]); an all-zero row gets scale 1."""
    absmax = weight.detach().float().abs().amax(dim=1)
    scales = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    weight_int8 = torch.round(weight.float() / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return weight_int8, scales
