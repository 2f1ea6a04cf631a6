"""A compressed-tensors checkpoint writer for tests, from the published layout (not tgserve's code):
round-to-nearest signed codes per group (or per output channel); `pack-quantized` stores them offset by
2**(bits-1), 32 / bits per int32 word, the first in the lowest bits, along the inputs (zero points along
the outputs); `int-quantized` stores int8 codes as they are."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CompressedTensors:
    tensors: dict[str, torch.Tensor]  # by suffix: weight_packed / weight, weight_scale, ...
    dequantized: torch.Tensor  # float32 [out, in]: what the checkpoint means

    def as_checkpoint(self, prefix: str) -> dict[str, torch.Tensor]:
        return {prefix + name: tensor for name, tensor in self.tensors.items()}


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int [rows, cols] unsigned codes -> int32 [rows, cols * bits / 32], value k of a word at bits k*bits."""
    per_word = 32 // bits
    rows, cols = values.shape
    words = torch.zeros(rows, cols // per_word, dtype=torch.int64)
    for k in range(per_word):
        words |= values[:, k::per_word].long() << (k * bits)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def ct_quantize(weight: torch.Tensor, bits: int, strategy: str, group_size: int, symmetric: bool,
                packed: bool = True, g_idx: torch.Tensor | None = None) -> CompressedTensors:
    """weight [out, in] -> the module's compressed tensors (strategy "group" or "channel"). `g_idx` [in]
    (actorder "group"): input i belongs to group g_idx[i] instead of i // group_size."""
    out_features, in_features = weight.shape
    group = in_features if strategy == "channel" else group_size
    groups = torch.arange(in_features) // group if g_idx is None else g_idx.long()
    order = torch.argsort(groups, stable=True)  # each group's inputs side by side, to take its min / max
    w = weight.float()[:, order].reshape(out_features, in_features // group, group)
    low_code, high_code = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    low, high = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    if symmetric:
        scale = (w.abs().amax(-1) / ((high_code - low_code) / 2)).clamp(min=1e-5)
    else:
        scale = ((high - low) / (high_code - low_code)).clamp(min=1e-5)
    scale = scale.to(torch.bfloat16).float()  # llm-compressor stores scales in the model's dtype
    zero = (torch.zeros_like(scale) if symmetric
            else torch.clamp(torch.round(low_code - low / scale), low_code, high_code))  # [out, G]
    codes = torch.clamp(torch.round(weight.float() / scale[:, groups] + zero[:, groups]), low_code, high_code)
    dequantized = (codes - zero[:, groups]) * scale[:, groups]  # [out, in], as the package (round after +zero)
    offset = 1 << (bits - 1)
    tensors = {"weight_scale": scale.to(torch.bfloat16)}
    if packed:
        tensors["weight_packed"] = pack_rows((codes + offset).to(torch.int32), bits)
        tensors["weight_shape"] = torch.tensor([out_features, in_features])
        if not symmetric:
            tensors["weight_zero_point"] = pack_rows((zero + offset).to(torch.int32).t(), bits).t().contiguous()
    else:
        tensors["weight"] = codes.to(torch.int8)
        if not symmetric:
            tensors["weight_zero_point"] = zero.to(torch.int8)
    if g_idx is not None:
        tensors["weight_g_idx"] = g_idx.to(torch.int32)
    return CompressedTensors(tensors, dequantized)


def quantization_config(bits: int, strategy: str, group_size: int, symmetric: bool, packed: bool = True,
                        ignore: list[str] | None = None, float_weights: bool = False, actorder: str | None = None
                        ) -> dict:
    """config.json's quantization_config as llm-compressor writes it for W4A16 / W8A16 (one group)."""
    weights = {"num_bits": bits, "type": "float" if float_weights else "int", "symmetric": symmetric,
               "strategy": strategy, "group_size": group_size if strategy == "group" else None,
               "dynamic": False, "actorder": actorder, "observer": "minmax"}
    return {"quant_method": "compressed-tensors", "quantization_status": "compressed",
            "format": "float-quantized" if float_weights else ("pack-quantized" if packed else "int-quantized"),
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None}},
            "ignore": ["lm_head"] if ignore is None else ignore, "kv_cache_scheme": None}
