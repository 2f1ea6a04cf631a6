"""The decoder layer's elementwise work between its GEMMs, as one object a backend may replace.

A layer carries its residual stream apart from its hidden states (vLLM's and TGI's shape): each norm
adds the sublayer's output into the residual, then normalizes the sum, so a backend can do both in
one pass over the row (`add_rms_norm`), and the MLP's SiLU gate and product are one op
(`silu_and_mul`); rotary position embedding of the queries and keys is one op too (`rotary`). `TorchFusedOps` is the reference, `tgserve_make_fused_ops`' core default: exactly the
ops the unfused decoder ran (sum in the model dtype, statistics in float32, scale in the model dtype),
so its outputs equal theirs bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tgserve.core.layers.rotary import apply_rotary


class TorchFusedOps:
    """The reference: plain torch ops, any device and dtype."""

    name = "torch"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [T, hidden] -> x / rms(x) * weight, same shape and dtype (statistics in float32)."""
        x32 = x.float()
        x32 = x32 * x32.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
        return weight * x32.to(x.dtype)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual [T, hidden] -> (rms_norm(x + residual), x + residual): the normalized input of
        the next sublayer and the residual it adds to. The sum is rounded to the model dtype first."""
        residual = residual + x
        return self.rms_norm(residual, weight, eps), residual

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [T, 2 * I] (gate, then up) -> silu(gate) * up [T, I], in the model dtype."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rotary(self, cos_sin: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """x [T, heads, d] (queries and keys together) rotated by `RotaryEmbedding.lookup`'s (cos, signed_sin),
        each [T, 1, d]: `apply_rotary`, HF's products and sum."""
        return apply_rotary(cos_sin, x)
