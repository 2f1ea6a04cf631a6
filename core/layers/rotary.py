"""Rotary position embedding (RoPE) with the rope_type variants Qwen2 and Llama checkpoints use.

The frequencies of each variant (default, linear, dynamic NTK, YaRN, llama3) come from
`rope_frequencies`; this module turns them into position-indexed tables and applies them.
"""
from __future__ import annotations

import torch
from torch import nn

from tgserve.core.layers.rope_frequencies import rope_frequencies


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables indexed by each token's absolute position, 0 .. max_positions - 1.

    YaRN's attention factor is folded into both tables, as transformers folds it into cos and sin.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        inv_freq, attention_factor = rope_frequencies(head_dim, theta, scaling, max_positions)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat([angles, angles], dim=-1)  # [max_positions, head_dim], HF's rotate_half layout
        sin = angles.sin() * attention_factor
        # rotate_half(x) * sin == swap_halves(x) * signed_sin, with the sign folded into the table.
        signed_sin = torch.cat([-sin, sin], dim=-1)
        self.register_buffer("cos", (emb.cos() * attention_factor).to(dtype=dtype, device=device), persistent=False)
        self.register_buffer("signed_sin", signed_sin.to(dtype=dtype, device=device), persistent=False)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, signed_sin), each [T, 1, head_dim]; once per step, shared by all layers."""
        return self.cos[positions].unsqueeze(1), self.signed_sin[positions].unsqueeze(1)


def apply_rotary(cos_sin: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, d] (queries and keys together, one call) by the looked-up (cos, signed_sin).

    Same products and sum as HF's `x * cos + rotate_half(x) * sin`, so float32 results are identical."""
    cos, signed_sin = cos_sin
    half = x.shape[-1] // 2
    swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)
    return x * cos + swapped * signed_sin
