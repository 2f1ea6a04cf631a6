"""A GPTQ checkpoint writer for tests, written from the published Hugging Face / AutoGPTQ layout (not
from tgserve's unpacking): round-to-nearest per group, codes and zero points packed as little-endian bit
streams in int32 words with Python integers, and the dequantization W[o, i] read straight off g_idx.

Layout (AutoGPTQ `pack`, GPTQModel, transformers' GPTQConfig): qweight int32 [in * b / 32, out] packs
the codes of each output column along the inputs; qzeros int32 [G, out * b / 32] packs each group's
zero points along the outputs; scales float16 [G, out]; g_idx int32 [in] gives each input's group.
For 3 bits a run of 32 codes fills 3 words. v1 checkpoints (AutoGPTQ) store zero - 1, v2 (GPTQModel)
the zero itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GptqTensors:
    qweight: torch.Tensor  # int32 [in * bits / 32, out]
    qzeros: torch.Tensor  # int32 [groups, out * bits / 32]
    scales: torch.Tensor  # float16 [groups, out]
    g_idx: torch.Tensor  # int32 [in]
    dequantized: torch.Tensor  # float64 [out, in]: what the checkpoint means

    def as_checkpoint(self, prefix: str = "", with_g_idx: bool = True) -> dict[str, torch.Tensor]:
        names = {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales}
        if with_g_idx:
            names["g_idx"] = self.g_idx
        return {prefix + name: tensor for name, tensor in names.items()}


def pack_stream(values: list[int], bits: int) -> list[int]:
    """Codes (each < 2**bits) -> int32 words of their little-endian bit stream, value k at bits k*bits."""
    stream = 0
    for k, value in enumerate(values):
        assert 0 <= value < (1 << bits)
        stream |= value << (k * bits)
    num_words = len(values) * bits // 32
    words = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(num_words)]
    return [word - (1 << 32) if word >= (1 << 31) else word for word in words]  # as signed int32


def gptq_quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool, act_order: bool,
                  version: int = 1, seed: int = 0) -> GptqTensors:
    """Round-to-nearest GPTQ tensors of `weight` [out, in]. With `act_order` the groups are formed over a
    random input order (as GPTQ's descending-Hessian order would), so g_idx is not monotone."""
    out_features, in_features = weight.shape
    group = in_features if group_size == -1 else group_size
    num_groups = -(-in_features // group)
    order = (torch.randperm(in_features, generator=torch.Generator().manual_seed(seed)) if act_order
             else torch.arange(in_features))
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[order] = (torch.arange(in_features) // group).to(torch.int32)
    maxq = (1 << bits) - 1
    w = weight.double()
    codes = torch.empty(in_features, out_features, dtype=torch.int64)
    zeros = torch.empty(num_groups, out_features, dtype=torch.int64)
    scales = torch.empty(num_groups, out_features, dtype=torch.float16)
    for g in range(num_groups):
        columns = (g_idx == g).nonzero().flatten()
        block = w[:, columns]  # [out, inputs of group g]
        low, high = block.min(dim=1).values.clamp(max=0), block.max(dim=1).values.clamp(min=0)
        if sym:
            high = torch.maximum(low.abs(), high)
            scale, zero = 2 * high / maxq, torch.full_like(high, (maxq + 1) // 2)
        else:
            scale = (high - low) / maxq
            # zero >= 1: AutoGPTQ's v1 cannot store a zero point of 0 (it writes zero - 1)
            zero = torch.round(-low / scale).clamp(1, maxq)
        scale = scale.to(torch.float16)
        scales[g] = scale
        zeros[g] = zero.long()
        codes[columns] = torch.clamp(torch.round(block / scale.double()[:, None]) + zero[:, None], 0, maxq).long().t()
    dequantized = ((codes.t() - zeros[g_idx.long()].t()).double() * scales[g_idx.long()].t().double()).contiguous()
    stored_zeros = zeros - 1 if version == 1 else zeros
    qweight = [pack_stream(codes[:, o].tolist(), bits) for o in range(out_features)]  # [out][in * b / 32]
    qzeros = [pack_stream(stored_zeros[g].tolist(), bits) for g in range(num_groups)]
    return GptqTensors(qweight=torch.tensor(qweight, dtype=torch.int32).t().contiguous(),
                       qzeros=torch.tensor(qzeros, dtype=torch.int32), scales=scales, g_idx=g_idx,
                       dequantized=dequantized)


def quantization_config(bits: int, group_size: int, sym: bool = True, desc_act: bool = False,
                        checkpoint_format: str | None = "gptq", **extra) -> dict:
    """config.json's quantization_config as transformers' GPTQConfig / GPTQModel write it."""
    section = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": sym, "desc_act": desc_act,
               **extra}
    if checkpoint_format is not None:
        section["checkpoint_format"] = checkpoint_format
    return section
