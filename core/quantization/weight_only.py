"""The common form of integer weight-only quantization, and the kernels that multiply by it.

GPTQ, AWQ, compressed-tensors, eetq and GGUF's Q4/Q8 all store, in their own packing, the same thing:
W[o, i] = (q[o, i] - zero[o, g]) * scale[o, g] with g = i // group_size (after an optional input
permutation for GPTQ's act-order). Each format's `LinearMethod` unpacks its tensors into an
`AffineQuantizedWeight` once at load; a `WeightOnlyKernel` then packs that for its matmul. The core's
`ReferenceKernel` keeps q unpacked (one byte per weight) and dequantizes per call: correct everywhere,
not fast. Backends return faster kernels (packed int4 / int8) from `tgserve_make_linear_method`; a
kernel that cannot take a weight (bits, group size) declines and the next one is asked.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class AffineQuantizedWeight:
    """One linear layer's integer weight in the common affine form (host of the packed kernels' inputs)."""

    q: torch.Tensor  # uint8 [out, in]: the integer codes, 0 <= q < 2**bits, inputs in kernel order
    scales: torch.Tensor  # float [out, num_groups]
    zeros: torch.Tensor  # float [out, num_groups], in code units: W = (q - zeros) * scales
    bits: int  # 2, 3, 4 or 8
    group_size: int  # inputs per group; equals in_features for one scale per output channel
    # int64 [in] or None: the kernel's input i reads x[..., input_perm[i]] (GPTQ act-order sorts
    # columns by group at load so groups are contiguous); None: inputs in checkpoint order.
    input_perm: torch.Tensor | None
    bias: torch.Tensor | None  # [out] in the run dtype, or None
    # int64 [in] or None: input i reads scales / zeros column input_groups[i], where groups are not runs
    # (a row-parallel rank's slice of an act-order layer, `act_order`); no grouped kernel reads that, so
    # `prepare_with` hands it to `DequantizedKernel`. None: input i reads column i // group_size.
    input_groups: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    @property
    def in_features(self) -> int:
        return self.q.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [out, in] in kernel input order (apply `input_perm` to x, not to this)."""
        if self.input_groups is not None:
            groups = self.input_groups
            return ((self.q.float() - self.zeros.float()[:, groups]) * self.scales.float()[:, groups]).to(dtype)
        if self.in_features % self.group_size:  # a ragged last group: scales gathered per input
            groups = torch.arange(self.in_features, device=self.q.device) // self.group_size
            return ((self.q.float() - self.zeros.float()[:, groups]) * self.scales.float()[:, groups]).to(dtype)
        # Else broadcast over [out, groups, group_size]: the same values as the gather, 2.4x faster
        # (measured on a 49152 x 576 weight), and the reference runs this every step.
        grouped = self.q.view(self.out_features, -1, self.group_size).float()
        weight = (grouped - self.zeros.float()[..., None]) * self.scales.float()[..., None]
        return weight.reshape(self.out_features, self.in_features).to(dtype)


class WeightOnlyKernel:
    """Packs an `AffineQuantizedWeight` once and multiplies activations by it per step."""

    name = "reference"

    def prepare(self, weight: AffineQuantizedWeight, dtype: torch.dtype) -> object | None:
        """What `apply` reads, or None when this kernel does not take this weight (bits, group size,
        dtype). Called once per layer at load; may free or keep `weight`'s tensors."""
        raise NotImplementedError

    def apply(self, prepared: object, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] in the run dtype -> [..., out_features]. Called per layer per step."""
        raise NotImplementedError


class ReferenceKernel(WeightOnlyKernel):
    """Any bits and group size: codes kept unpacked, the weight dequantized on every call (torch only)."""

    name = "reference"

    def prepare(self, weight: AffineQuantizedWeight, dtype: torch.dtype) -> object:
        return weight, dtype

    def apply(self, prepared: object, x: torch.Tensor) -> torch.Tensor:
        weight, dtype = prepared
        if weight.input_perm is not None:
            x = x.index_select(-1, weight.input_perm)
        return F.linear(x, weight.dequantize(dtype), weight.bias)


class DequantizedKernel(WeightOnlyKernel):
    """The weight dequantized once at load into the run dtype, then `F.linear`: for weights whose groups
    are not runs (`input_groups`), which no packed kernel reads and the reference would dequantize on
    every call."""

    name = "dequantized"

    def prepare(self, weight: AffineQuantizedWeight, dtype: torch.dtype) -> object:
        return weight.dequantize(dtype), weight.bias, weight.input_perm

    def apply(self, prepared: object, x: torch.Tensor) -> torch.Tensor:
        dense, bias, input_perm = prepared
        if input_perm is not None:
            x = x.index_select(-1, input_perm)
        return F.linear(x, dense, bias)


def prepare_with(kernels: tuple[WeightOnlyKernel, ...], weight: AffineQuantizedWeight, dtype: torch.dtype
                 ) -> tuple[WeightOnlyKernel, object]:
    """The first of `kernels` that takes `weight` (the reference always does), and its prepared form; a
    weight whose groups are not runs goes to `DequantizedKernel` without asking them."""
    if weight.input_groups is not None:
        kernel = DequantizedKernel()
        return kernel, kernel.prepare(weight, dtype)
    for kernel in (*kernels, ReferenceKernel()):
        prepared = kernel.prepare(weight, dtype)
        if prepared is not None:
            return kernel, prepared
    raise AssertionError("unreachable: the reference kernel takes every weight")
