"""Linear layers whose weight layout and matmul come from a pluggable `LinearMethod`.

The method is what quantization and device backends swap: the core's reference is plain
`F.linear`; the cpu backend pre-packs weights for oneDNN; a GPTQ method would unpack int4 groups.
A layer never branches on the method's class.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearMethod:
    """Reference unquantized method: keep the [out, in] weight as is and call `F.linear`."""

    name = "unquantized"

    def prepare(self, weight: torch.Tensor, bias: torch.Tensor | None) -> object:
        """Turn a loaded weight [out_features, in_features] (+ bias [out_features]) into params."""
        return weight, bias

    def apply(self, params: object, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] -> [..., out_features]."""
        weight, bias = params
        return F.linear(x, weight, bias)


class Linear(nn.Module):
    """y = x W^T + b with W loaded from a checkpoint, possibly from several stacked tensors.

    `shard_sizes` lists the output rows of each checkpoint tensor fused into this layer (q, k, v
    become one qkv layer); `load(index, tensor)` fills one of them.
    """

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool, method: LinearMethod,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.in_features = in_features
        self.shard_sizes = shard_sizes
        self.out_features = sum(shard_sizes)
        self.method = method
        self.weight = torch.empty(self.out_features, in_features, dtype=dtype, device=device)
        self.bias = torch.zeros(self.out_features, dtype=dtype, device=device) if bias else None
        self.params: object = None

    def _rows(self, index: int) -> slice:
        start = sum(self.shard_sizes[:index])
        return slice(start, start + self.shard_sizes[index])

    def load(self, index: int, name: str, tensor: torch.Tensor) -> None:
        """Copy checkpoint tensor `name` (".weight" or ".bias") into fused shard `index`."""
        target = self.weight if name.endswith("weight") else self.bias
        if target is None:
            raise ValueError(f"checkpoint has {name} but the layer has no bias")
        target[self._rows(index)].copy_(tensor)

    def finalize(self) -> None:
        """Hand the loaded tensors to the method (packing, quantizing); called once after loading."""
        self.params = self.method.prepare(self.weight, self.bias)
        self.weight = self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self.params, x)
