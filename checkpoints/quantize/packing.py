"""The checkpoint tensors of a quantized linear in the layouts Hugging Face loaders read.

GPTQ (AutoGPTQ's `QuantLinear.pack`, checkpoint_format "gptq", the v1 zero offset):
  qweight int32 [in * bits / 32, out]: row r holds inputs r*k .. r*k+k-1 (k = 32 / bits), input
      r*k + j in bits [bits*j, bits*j + bits) of each output column
  qzeros  int32 [num_groups, out * bits / 32]: column c holds outputs c*k .. c*k+k-1 the same way,
      each stored as zero - 1
  scales  float16 [num_groups, out];  g_idx int32 [in]: each input's group
AWQ GEMM (AutoAWQ's `WQLinear_GEMM`, version "gemm", 4 bits):
  qweight int32 [in, out / 8]: column c holds outputs c*8 + ORDER[j] in nibble j, ORDER = 0,2,4,6,1,3,5,7
  qzeros  int32 [num_groups, out / 8]: the zeros, packed the same way, stored as they are
  scales  float16 [num_groups, out]
"""
from __future__ import annotations

import torch

from tgserve.checkpoints.quantize.affine import QuantizedLinear

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _pack_last_dim(values: torch.Tensor, bits: int) -> torch.Tensor:
    """values [..., n * k] (each < 2**bits) -> int32 [..., n]: value j of each k in bits [bits*j, bits*j+bits)."""
    per_word = 32 // bits
    grouped = values.to(torch.int64).reshape(*values.shape[:-1], -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (grouped << shifts).sum(dim=-1)  # disjoint bit fields: the sum is their OR
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_gptq(quantized: QuantizedLinear, bits: int) -> dict[str, torch.Tensor]:
    """{"qweight", "qzeros", "scales", "g_idx"} of one linear in AutoGPTQ's v1 layout."""
    qweight = _pack_last_dim(quantized.codes, bits).t().contiguous()  # codes [out, in] packed along inputs
    qzeros = _pack_last_dim(quantized.zeros - 1, bits)
    return {"qweight": qweight, "qzeros": qzeros, "scales": quantized.scales.to(torch.float16).contiguous(),
            "g_idx": quantized.g_idx.to(torch.int32).contiguous()}


def _pack_awq(values: torch.Tensor) -> torch.Tensor:
    """values [rows, out] (4-bit) -> int32 [rows, out / 8] in AWQ's interleaved nibble order."""
    order = torch.tensor(AWQ_PACK_ORDER)
    interleaved = values.reshape(values.shape[0], -1, 8)[:, :, order].reshape(values.shape[0], -1)
    return _pack_last_dim(interleaved, 4)


def pack_awq(quantized: QuantizedLinear) -> dict[str, torch.Tensor]:
    """{"qweight", "qzeros", "scales"} of one linear in AutoAWQ's GEMM layout (4 bits)."""
    return {"qweight": _pack_awq(quantized.codes.t().contiguous()), "qzeros": _pack_awq(quantized.zeros),
            "scales": quantized.scales.to(torch.float16).contiguous()}
