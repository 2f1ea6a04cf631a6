"""RMSNorm as Qwen2 and Llama define it (statistics in float32, scale in the model dtype)."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, hidden] -> same shape and dtype."""
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * x32.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        return self.weight * x32.to(dtype)
