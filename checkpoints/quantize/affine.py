"""The integer form GPTQ and AWQ share: per (output row, input group) scale and zero point, codes in [0, 2**bits).

W[o, i] ~= (codes[o, i] - zeros[g_idx[i], o]) * scales[g_idx[i], o]. Scales are rounded to float16 as
soon as they are chosen, so what an algorithm measures its error against is exactly what the
checkpoint stores (both formats keep scales in float16).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

_MIN_SCALE = 1e-6  # a group of zeros still gets a positive, float16-representable scale


@dataclass(slots=True, frozen=True)
class QuantSpec:
    """What the user asked `tgserve quantize` for (validated by source.check_layout)."""

    method: str  # "gptq" or "awq"
    bits: int  # 2, 4 or 8 (gptq); 4 (awq)
    group_size: int  # input features per scale; -1: one group per output row (gptq only)
    is_act_order: bool = False  # gptq desc_act: columns processed by decreasing Hessian diagonal
    is_sym: bool = False  # gptq sym: zero point fixed at 2**(bits-1)
    # gptq: dampening added to diag(H), as a fraction of its mean. GPTQModel's default (0.05; AutoGPTQ and
    # the paper used 0.01): with the few thousand calibration tokens tgserve ships, 0.01 overfits layers
    # with many inputs. SmolLM2 layer 5 down_proj (1,536 inputs), calibrated on 3,400 tokens, output error
    # on 3,400 others: round-to-nearest 1.11e-2, GPTQ 1.37e-2 at 0.01, 1.17e-2 at 0.05; q_proj 7.4e-3 -> 6.8e-3.
    damp_percent: float = 0.05
    # gptq: lm_head quantized too, with these bits (the rest of the spec as the layers'); None: float head
    lm_head_bits: int | None = None

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def head_spec(self) -> "QuantSpec | None":
        """The spec lm_head is quantized with (the layers' with lm_head_bits), or None for a float head."""
        if self.lm_head_bits is None:
            return None
        return dataclasses.replace(self, bits=self.lm_head_bits, lm_head_bits=None)


@dataclass(slots=True)
class QuantizedLinear:
    """One linear layer's quantized weight, before packing (host tensors)."""

    codes: torch.Tensor  # int32 [out, in], 0 <= codes <= maxq, inputs in checkpoint order
    scales: torch.Tensor  # float16 [num_groups, out]
    zeros: torch.Tensor  # int32 [num_groups, out], in code units
    g_idx: torch.Tensor  # int32 [in]: the group of each input feature (i // group_size without act-order)

    def dequantize(self) -> torch.Tensor:
        """W [out, in] float32 (used by the algorithms; tests use their own dequantizer)."""
        groups = self.g_idx.long()
        scales = self.scales.float()[groups].t()  # [out, in]
        return (self.codes.float() - self.zeros.float()[groups].t()) * scales


def group_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32 holding float16 values) and integer zero for each row of w [out, group]: [out] each.

    Asymmetric: the range [min(w, 0), max(w, 0)] maps onto [0, maxq] (GPTQ's min/max quantizer; AWQ
    uses the same with zero_point). Symmetric: zero = 2**(bits-1), scale from max |w|. A zero point
    of 0 is moved to 1 with the scale widened to match: GPTQ's v1 checkpoint stores zero - 1, and a
    stored -1 does not fit its bits.
    """
    maxq = spec.maxq
    low = w.min(dim=1).values.clamp(max=0)
    high = w.max(dim=1).values.clamp(min=0)
    if spec.is_sym:
        high = torch.maximum(low.abs(), high)
        scale = (2 * high / maxq).clamp(min=_MIN_SCALE).half().float()
        zero = torch.full_like(scale, (maxq + 1) // 2, dtype=torch.int32)
        return scale, zero
    scale = ((high - low) / maxq).clamp(min=_MIN_SCALE)
    zero = torch.round(-low / scale).to(torch.int32)
    needs_shift = zero == 0
    if spec.method == "gptq" and bool(needs_shift.any()):
        scale = torch.where(needs_shift, (high / (maxq - 1)).clamp(min=_MIN_SCALE), scale)
        zero = torch.where(needs_shift, torch.ones_like(zero), zero)
    return scale.half().float(), zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes (int32, same shape as w) of w [out, n] under per-row scale/zero [out]."""
    return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, maxq).to(torch.int32)


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """w [out, in] quantized and dequantized group by group (round to nearest): AWQ's inner step."""
    return round_to_nearest(w, spec).dequantize()


def round_to_nearest(w: torch.Tensor, spec: QuantSpec) -> QuantizedLinear:
    """Plain round-to-nearest of w [out, in] with spec's bits and groups (no calibration data).

    A last group shorter than the others (in_features not a multiple of the group size) has its own
    scale, as GPTQ's ceil(in / group) groups.
    """
    out_features, in_features = w.shape
    group = spec.group_size_for(in_features)
    num_groups = -(-in_features // group)
    num_whole = in_features // group
    codes = torch.empty(out_features, in_features, dtype=torch.int32)
    scales = torch.empty(num_groups, out_features)
    zeros = torch.empty(num_groups, out_features, dtype=torch.int32)
    # The whole groups at once: rows of [out * num_whole, group].
    whole = w[:, :num_whole * group].float().reshape(out_features * num_whole, group)
    scale, zero = group_params(whole, spec)
    codes[:, :num_whole * group] = quantize_codes(whole, scale, zero, spec.maxq).reshape(out_features, -1)
    scales[:num_whole] = scale.reshape(out_features, num_whole).t()
    zeros[:num_whole] = zero.reshape(out_features, num_whole).t()
    if num_whole < num_groups:
        tail = w[:, num_whole * group:].float()
        scale, zero = group_params(tail, spec)
        codes[:, num_whole * group:] = quantize_codes(tail, scale, zero, spec.maxq)
        scales[num_whole], zeros[num_whole] = scale, zero
    g_idx = (torch.arange(in_features) // group).to(torch.int32)
    return QuantizedLinear(codes=codes, scales=scales.half(), zeros=zeros, g_idx=g_idx)
