"""`--quantize bitsandbytes-nf4`: a float checkpoint quantized at load to 4-bit NormalFloat, as
bitsandbytes' `Params4bit(quant_type="nf4", blocksize=64)` does.

The weight [out, in] is flattened row-major and cut into blocks of 64 consecutive values (the last block
may be shorter, and blocks may straddle rows); each block keeps its absmax (float32), each value
becomes the index of the NF4 code nearest to value * (1 / absmax) (bitsandbytes multiplies by the
reciprocal; on a tie the lower code), and two indices share a byte, the first in the high nibble.
W = NF4[index] * absmax. Unlike TGI (compress_statistics=True) the absmax stay float32, not
double-quantized. Every linear layer is quantized but lm_head, which stays float as transformers'
bitsandbytes integration leaves it (quant_config.AT_LOAD_QUANTIZED_HEAD). The reference keeps the packed
bytes (half a byte per weight) and dequantizes on every call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tgserve.core.quantization.method import QuantizedLinearMethod

BLOCK_SIZE = 64
# The 16 NF4 values (quantiles of N(0, 1) scaled to [-1, 1], QLoRA, arXiv 2305.14314), as hard-coded in
# bitsandbytes' `get_4bit_type("nf4")`, bitsandbytes/functional.py (read in bitsandbytes 0.50.2).
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)


@dataclass(slots=True)
class Nf4Weight:
    """One layer's NF4 weight, as `apply` reads it."""

    packed: torch.Tensor  # uint8 [ceil(out * in / 2)]: two code indices per byte, the first in the high nibble
    absmax: torch.Tensor  # float32 [ceil(out * in / 64)]: one scale per block of 64 flattened weights
    shape: tuple[int, int]  # (out, in)
    bias: torch.Tensor | None  # [out] in the run dtype, or None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [out, in] in `dtype` (computed in float32)."""
        return dequantize_nf4(self.packed, self.absmax, self.shape).to(dtype)


class Nf4LinearMethod(QuantizedLinearMethod):
    """Loads a dense float weight as the reference does, then keeps it as packed NF4 + block absmax."""

    name = "bitsandbytes-nf4"

    def prepare(self, params: dict[str, torch.Tensor]) -> Nf4Weight:
        weight = params["weight"]
        packed, absmax = quantize_nf4(weight)
        return Nf4Weight(packed, absmax, tuple(weight.shape), params.get("bias"))

    def apply(self, prepared: Nf4Weight, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, prepared.dequantize(x.dtype), prepared.bias)


def quantize_nf4(weight: torch.Tensor, block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Any-shape float tensor -> (uint8 packed [ceil(n / 2)], float32 absmax [ceil(n / block_size)])."""
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    num_blocks = -(-n // block_size)
    blocks = F.pad(flat, (0, num_blocks * block_size - n)).view(num_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)
    # An all-zero block: bitsandbytes clamps absmax to 1e-38, every value then maps to code 0.0.
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp_(-1, 1).reshape(-1)[:n + n % 2]
    # The code's midpoints, compared as bitsandbytes' bucketize does: a value on a midpoint takes the lower
    # code. An odd count's last byte is padded with the code of 0.0, as bitsandbytes pads.
    code = torch.tensor(NF4_CODE)
    indices = torch.bucketize(scaled, (code[1:] + code[:-1]) / 2).to(torch.uint8)
    return (indices[0::2] << 4) | indices[1::2], absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...],
                   block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """(packed, absmax) from `quantize_nf4` -> float32 tensor of `shape`."""
    n = 1
    for size in shape:
        n *= size
    indices = torch.stack((packed >> 4, packed & 0xF), dim=1).reshape(-1)[:n].long()
    values = torch.tensor(NF4_CODE, device=packed.device)[indices]
    scales = absmax.repeat_interleave(block_size)[:n]
    return (values * scales).reshape(shape)
