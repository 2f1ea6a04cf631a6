"""fp8 (float8 e4m3) weight-only linears: pre-quantized checkpoints, or a float checkpoint quantized at load.

Pre-quantized (`quant_method` "fp8" or "fbgemm_fp8"): `weight` is float8_e4m3fn [out, in] and
W = weight * scale, the scale being either `weight_scale`, per tensor ([] or [1]) or per output channel
([out] or [out, 1]), or, with `weight_block_size` [b0, b1] in the config (DeepSeek / Qwen FP8 style),
block-wise `weight_scale_inv` [ceil(out / b0), ceil(in / b1)] (multiplied, despite its name; the last
blocks may be ragged). Every scale is expanded at load to one row per output feature
(`LinearParam.row_block`), so a fused q/k/v or gate/up layer whose parts carry different per-tensor
scales needs nothing special. `input_scale` (static activation scales for W8A8) is read and ignored:
tgserve runs W8A16, activations stay in the run dtype.

At load (`--quantize fp8` on a float checkpoint): each output channel gets scale = absmax / 448
(e4m3's largest finite value) and W / scale is rounded to e4m3; every linear layer but lm_head, which
stays float as in llm-compressor's FP8 recipes and vLLM's at-load fp8 (quant_config.AT_LOAD_QUANTIZED_HEAD).

The reference keeps the fp8 weight (1 byte per weight) and dequantizes it on every call; fp8 is not an
affine integer code, so this method overrides `prepare` / `apply` rather than `to_affine`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tgserve.core.layers.linear import LinearParam
from tgserve.core.quantization.method import QuantizedLinearMethod, _listed
from tgserve.core.quantization.quant_config import QuantizationError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


@dataclass(slots=True)
class Fp8Weight:
    """One layer's fp8 weight, as `apply` reads it."""

    weight: torch.Tensor  # float8_e4m3fn [out, in]
    scales: torch.Tensor  # float32 [out, num_groups]: W[o, i] = weight[o, i] * scales[o, i // group_size]
    group_size: int  # inputs per scale column (in_features for per-tensor / per-channel scales)
    bias: torch.Tensor | None  # [out] in the run dtype, or None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [out, in] in `dtype` (computed in float32)."""
        groups = torch.arange(self.weight.shape[1], device=self.weight.device) // self.group_size
        return (self.weight.float() * self.scales[:, groups]).to(dtype)


class Fp8LinearMethod(QuantizedLinearMethod):
    """fp8 e4m3 weights with float32 scales, matmul in the run dtype (W8A16)."""

    name = "fp8"

    def is_quantized_layer(self, prefixes: tuple[str, ...]) -> bool:
        """The base rule, plus vLLM-style fp8 configs' `ignored_layers`."""
        ignored = self.quantization.checkpoint_config.get("ignored_layers") or []
        return super().is_quantized_layer(prefixes) and not any(_listed(name, ignored) for name in prefixes)

    @property
    def block_size(self) -> tuple[int, int] | None:
        """The checkpoint's `weight_block_size` [b0 outputs, b1 inputs], or None (per-tensor / per-channel)."""
        block = self.quantization.checkpoint_config.get("weight_block_size")
        return None if not block else (int(block[0]), int(block[1]))

    def create_params(self, in_features: int, output_sizes: list[int], has_bias: bool,
                      dtype: torch.dtype, device: torch.device) -> dict[str, LinearParam]:
        if not self.quantization.is_prequantized:  # a dense float weight, quantized in `prepare`
            return super().create_params(in_features, output_sizes, has_bias, dtype, device)
        fmt = self.quantization.checkpoint_config.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise QuantizationError(f"the checkpoint's fp8 quantization_config has fmt {fmt!r}; tgserve loads e4m3")
        out_features = sum(output_sizes)
        params = {"weight": LinearParam(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                        output_dim=0, input_dim=1)}
        # Scales start as NaN so a layer whose checkpoint lacks them fails in `prepare`, not silently.
        if self.block_size is None:
            params["weight_scale"] = LinearParam(torch.full((out_features, 1), float("nan"), device=device),
                                                 output_dim=0, row_block=1)
        else:
            rows, cols = self.block_size
            num_groups = -(-in_features // cols)
            # A ragged last input block cannot split over row-parallel ranks: then held whole.
            splits = in_features % cols == 0
            params["weight_scale_inv"] = LinearParam(
                torch.full((out_features, num_groups), float("nan"), device=device), output_dim=0,
                input_dim=1 if splits else None, input_pack=cols if splits else 1, row_block=rows)
        params["input_scale"] = LinearParam(torch.empty(out_features, 1, device=device), output_dim=0, row_block=1)
        if has_bias:
            params["bias"] = LinearParam(torch.zeros(out_features, dtype=dtype, device=device), output_dim=0)
        return params

    def prepare(self, params: dict[str, torch.Tensor]) -> Fp8Weight:
        bias = params.get("bias")
        if not self.quantization.is_prequantized:
            weight, scales = quantize_fp8_per_channel(params["weight"])
            return Fp8Weight(weight, scales[:, None], weight.shape[1], bias)
        weight = params["weight"]
        if self.block_size is None:
            scales, group_size, scale_name = params["weight_scale"], weight.shape[1], "weight_scale"
        else:
            scales, group_size, scale_name = params["weight_scale_inv"], self.block_size[1], "weight_scale_inv"
        if torch.isnan(scales).any():
            raise QuantizationError(f"an fp8 layer [{weight.shape[1]} -> {weight.shape[0]}] has no {scale_name} "
                                    f"for some of its outputs (the checkpoint lacks it)")
        return Fp8Weight(weight, scales.float(), group_size, bias)

    def apply(self, prepared: Fp8Weight, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, prepared.dequantize(x.dtype), prepared.bias)


def quantize_fp8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] float -> (float8_e4m3fn [out, in], float32 scales [out]), scale = absmax / 448;
    an all-zero row gets scale 1. Clamped before the cast: older torch turns overflow into NaN."""
    weight = weight.detach().float()
    absmax = weight.abs().amax(dim=1)
    scales = torch.where(absmax > 0, absmax / FP8_MAX, torch.ones_like(absmax))
    return (weight / scales[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scales
