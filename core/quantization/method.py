"""The shared shape of a quantized format's `LinearMethod`: which layers it quantizes, and its kernels.

A format subclass says how its checkpoint tensors are named and shaped (`create_params`) and how to
turn them into the common affine form (`to_affine`); this base picks the kernel and runs it. Layers
the checkpoint left in float (lm_head, `modules_to_not_convert`, compressed-tensors' `ignore`) get the
backend's dense method through `method_for`. Formats whose weights are not affine integers (fp8, nf4)
override `prepare` / `apply` themselves.

A layer whose groups are not runs on this rank (a row-parallel slice that cuts groups, or any slice of
an act-order layer, `act_order`) is dequantized once at load, at the run dtype's size rather than the
codes'. The model-wide method keeps a ledger of those layers, shared with its per-layer copies, and
`describe_loaded` names them and their memory in the start-up log, so a sharded server's users see why
a rank holds more than its share of the quantized checkpoint.
"""
from __future__ import annotations

import re
from collections import Counter

import torch

from tgserve.core.layers.linear import LinearMethod
from tgserve.core.quantization.quant_config import QuantizationConfig
from tgserve.core.quantization.weight_only import (AffineQuantizedWeight, DequantizedKernel, WeightOnlyKernel,
                                                   prepare_with)


class QuantizedLinearMethod(LinearMethod):
    """Base of every quantized format; one instance shared by the model's quantized layers."""

    name = "quantized"

    def __init__(self, quantization: QuantizationConfig, dtype: torch.dtype, dense: LinearMethod,
                 kernels: tuple[WeightOnlyKernel, ...] = (), prefixes: tuple[str, ...] = (),
                 dequantized: list[tuple[str, int]] | None = None):
        self.quantization = quantization
        self.dtype = dtype  # the run dtype: activations, outputs, biases
        self.dense = dense  # the backend's unquantized method, for layers the checkpoint keeps in float
        self.kernels = kernels  # the backend's fast kernels, asked in order before the reference
        self.prefixes = prefixes  # a layer's copy: the checkpoint modules fused into it; () model-wide
        # (layer name, bytes of its dense weight) per layer prepared with DequantizedKernel, in load
        # order; one list shared by the model-wide method and every copy `method_for` binds
        self.dequantized = [] if dequantized is None else dequantized

    def method_for(self, prefixes: tuple[str, ...]) -> LinearMethod:
        return self if self.is_quantized_layer(prefixes) else self.dense

    def is_quantized_layer(self, prefixes: tuple[str, ...]) -> bool:
        """Whether the checkpoint layer(s) named `prefixes` ("model.layers.0.mlp.down_proj") hold this
        format's tensors. Default: a float checkpoint quantized at load quantizes every layer, lm_head
        only where `quantization.is_lm_head_quantized` (eetq); a pre-quantized one every layer but
        lm_head and those its config lists as not converted."""
        if not self.quantization.is_prequantized:
            return self.quantization.is_lm_head_quantized or "lm_head" not in prefixes
        skipped = self.quantization.checkpoint_config.get("modules_to_not_convert") or []
        return not any(name == "lm_head" or _listed(name, skipped) for name in prefixes)

    def describe(self) -> str:
        return self.quantization.describe()

    def to_affine(self, params: dict[str, torch.Tensor]) -> AffineQuantizedWeight:
        """This format's loaded tensors (by checkpoint suffix) -> the common affine form."""
        raise NotImplementedError

    def prepare(self, params: dict[str, torch.Tensor]) -> object:
        kernel, prepared = prepare_with(self.kernels, self.to_affine(params), self.dtype)
        if isinstance(kernel, DequantizedKernel):
            dense = prepared[0]
            self.dequantized.append((", ".join(self.prefixes) or "a layer", dense.numel() * dense.element_size()))
        return kernel, prepared

    def describe_loaded(self) -> str | None:
        """"2 quantized layers dequantized to float32 at load, 0.2 MiB: model.layers.*.mlp.down_proj x2 (...)",
        or None where every quantized layer kept its codes."""
        if not self.dequantized:
            return None
        num_bytes = sum(size for _, size in self.dequantized)
        kinds = Counter(re.sub(r"\.\d+\.", ".*.", name) for name, _ in self.dequantized)
        names = ", ".join(f"{kind} x{count}" for kind, count in kinds.items())
        num_layers, dtype_name = len(self.dequantized), str(self.dtype).removeprefix("torch.")
        return (f"{num_layers} quantized layer{'s' if num_layers > 1 else ''} dequantized to {dtype_name} at load, "
                f"{num_bytes / 2**20:.1f} MiB: {names} (this rank's slice of their inputs does not hold whole "
                f"quantization groups, which the grouped kernels need)")

    def apply(self, prepared: object, x: torch.Tensor) -> torch.Tensor:
        kernel, packed = prepared
        return kernel.apply(packed, x)


def _listed(name: str, modules: list[str]) -> bool:
    """`name` is, or sits under, one of `modules` (plain names match any path component)."""
    return any(name == module or name.endswith("." + module) or ("." + module + ".") in name + "."
               for module in modules)
