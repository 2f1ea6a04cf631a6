"""GPTQ (Frantar et al., 2022) on one linear layer: quantize column by column, each column's rounding
error spread over the columns not yet quantized through the inverse Hessian of the layer's inputs.

H = 2 X^T X over the calibration tokens (X [tokens, in]), dampened by `damp_percent` of its mean
diagonal. The upper Cholesky factor U of H^-1 gives each column's update row: after quantizing column
j, err = (w_j - q_j) / U[j, j] and W[:, j+1:] -= err U[j, j+1:]. Updates are applied lazily: inside a
block of columns at once, to the columns after the block once per block. A group's scale and zero are
chosen when the group's first column comes up, from the group's columns as updated so far (blocks are
whole groups, so those columns are current). Act-order processes columns by decreasing diag(H) and
records each input's group in g_idx (desc_act, AutoGPTQ's default without static groups).
"""
from __future__ import annotations

import torch

from tgserve.checkpoints.quantize.affine import QuantizedLinear, QuantSpec, group_params, quantize_codes

_BLOCK_COLUMNS = 128  # lazy-update block, rounded to whole groups
_MAX_DAMP_RETRIES = 6  # each retry multiplies the dampening by 10 (a singular H from too few tokens)


class HessianAccumulator:
    """Sums X^T X of one linear's inputs over calibration batches (float64, CPU)."""

    def __init__(self, in_features: int) -> None:
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.num_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """x: [..., in_features], the layer's input for one batch."""
        flat = x.reshape(-1, x.shape[-1]).to(torch.float64)
        self.xtx += flat.t() @ flat
        self.num_tokens += flat.shape[0]

    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / num_tokens, float32 [in, in]."""
        return (2.0 * self.xtx / max(self.num_tokens, 1)).float()


def _inverse_cholesky(h: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, raising the dampening until H is positive definite."""
    damp = damp_percent * torch.mean(torch.diag(h))
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for _ in range(_MAX_DAMP_RETRIES):
        lower, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inverse, upper=True)
        damp = damp * 10
    raise RuntimeError("GPTQ: the Hessian is not positive definite even with heavy dampening")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec) -> QuantizedLinear:
    """Quantize weight [out, in] (float) with GPTQ given H [in, in]; returns codes in checkpoint order."""
    w = weight.detach().float().clone()
    h = hessian.clone()
    out_features, in_features = w.shape
    dead = torch.diag(h) == 0  # inputs never active in calibration: any value is as good
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True) if spec.is_act_order else torch.arange(in_features)
    w, h = w[:, perm], h[perm][:, perm]
    u = _inverse_cholesky(h, spec.damp_percent)

    group = spec.group_size_for(in_features)
    num_groups = -(-in_features // group)
    block = group * max(1, _BLOCK_COLUMNS // group) if spec.group_size != -1 else _BLOCK_COLUMNS
    codes = torch.empty(out_features, in_features, dtype=torch.int32)
    scales = torch.empty(num_groups, out_features)
    zeros = torch.empty(num_groups, out_features, dtype=torch.int32)
    if spec.group_size == -1:
        scales[0], zeros[0] = group_params(w, spec)
    for start in range(0, in_features, block):
        end = min(start + block, in_features)
        w_block = w[:, start:end].clone()
        err_block = torch.zeros_like(w_block)
        u_block = u[start:end, start:end]
        for i in range(end - start):
            column = start + i
            g = column // group
            if spec.group_size != -1 and column % group == 0:
                scales[g], zeros[g] = group_params(w_block[:, i:i + group], spec)
            q = quantize_codes(w_block[:, i:i + 1], scales[g], zeros[g], spec.maxq)[:, 0]
            codes[:, column] = q
            dequantized = (q.float() - zeros[g].float()) * scales[g]
            err = (w_block[:, i] - dequantized) / u_block[i, i]
            w_block[:, i:] -= err[:, None] * u_block[i, i:][None, :]
            err_block[:, i] = err
        w[:, end:] -= err_block @ u[start:end, end:]

    inverse = torch.argsort(perm)
    g_idx = (torch.arange(in_features) // group)[inverse].to(torch.int32)
    return QuantizedLinear(codes=codes[:, inverse].contiguous(), scales=scales.half(), zeros=zeros, g_idx=g_idx)
