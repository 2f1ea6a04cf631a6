"""An AWQ GEMM checkpoint writer for tests, from AutoAWQ's published layout (not tgserve's code):
round-to-nearest 4-bit codes per group of inputs, packed eight per int32 along the outputs with AutoAWQ's
interleaved order (nibble j of word c holds output column 8c + [0, 2, 4, 6, 1, 3, 5, 7][j])."""
from __future__ import annotations

from dataclasses import dataclass

import torch

PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


@dataclass
class AwqTensors:
    qweight: torch.Tensor  # int32 [in, out / 8]
    qzeros: torch.Tensor | None  # int32 [G, out / 8]; None when written without zero points
    scales: torch.Tensor  # float16 [G, out]
    dequantized: torch.Tensor  # float32 [out, in]: what the checkpoint means

    def as_checkpoint(self, prefix: str) -> dict[str, torch.Tensor]:
        tensors = {prefix + "qweight": self.qweight, prefix + "scales": self.scales}
        if self.qzeros is not None:
            tensors[prefix + "qzeros"] = self.qzeros
        return tensors


def pack_columns(values: torch.Tensor) -> torch.Tensor:
    """int [rows, cols] codes 0..15 -> int32 [rows, cols / 8], one word at a time in AutoAWQ's order."""
    rows, cols = values.shape
    words = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for word in range(cols // 8):
        for nibble in range(8):
            words[:, word] |= values[:, 8 * word + PACK_ORDER[nibble]].long() << (4 * nibble)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the int32 bit pattern


def awq_quantize(weight: torch.Tensor, group_size: int, zero_point: bool, write_zeros: bool = True) -> AwqTensors:
    """weight [out, in] float -> AWQ tensors (group_size -1: one group). zero_point: min/max codes with an
    integer zero; else symmetric codes stored +8 with zero 8 (qzeros written only if `write_zeros`)."""
    out_features, in_features = weight.shape
    group = in_features if group_size == -1 else group_size
    w = weight.float().reshape(out_features, in_features // group, group)
    if zero_point:
        low, high = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scale = ((high - low) / 15).clamp(min=1e-5)
        zero = torch.round(-low / scale).clamp(0, 15)
    else:
        scale = (w.abs().amax(-1) / 7).clamp(min=1e-5)
        zero = torch.full_like(scale, 8.0)
    scale = scale.half().float()  # what the checkpoint stores
    codes = torch.clamp(torch.round(w / scale[..., None]) + zero[..., None], 0, 15)
    dequantized = ((codes - zero[..., None]) * scale[..., None]).reshape(out_features, in_features)
    codes = codes.reshape(out_features, in_features).t().to(torch.int32)  # [in, out]
    return AwqTensors(qweight=pack_columns(codes),
                      qzeros=pack_columns(zero.t().to(torch.int32)) if write_zeros else None,
                      scales=scale.t().contiguous().half(), dequantized=dequantized)


def quantization_config(group_size: int, zero_point: bool = True, version: str = "gemm") -> dict:
    """config.json's quantization_config as AutoAWQ writes it."""
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": zero_point,
            "version": version, "modules_to_not_convert": None}
