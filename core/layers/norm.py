"""RMSNorm as Qwen2 and Llama define it (statistics in float32, scale in the model dtype).

The module holds the weight and eps; the arithmetic is the fused-ops object's (core/layers/fused_ops.py),
so a backend's kernel can add the residual in the same pass."""
from __future__ import annotations

import torch
from torch import nn

from tgserve.core.layers.fused_ops import TorchFusedOps


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device,
                 ops: object | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps
        self.ops = ops or TorchFusedOps()  # a FusedOps-like object (TorchFusedOps or a backend's)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x: [num_tokens, hidden] -> same shape and dtype. With `residual` [num_tokens, hidden]:
        normalizes x + residual and returns (normalized, x + residual)."""
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)
