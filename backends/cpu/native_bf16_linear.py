"""bf16 linears where oneDNN has no bf16 path (AVX2-only CPUs): native/bf16_gemm.cpp on weights packed once.

On such a CPU `F.linear` in bf16 widens the weight to float32 on every call, so `--dtype bfloat16` ran
slower than float32 although it reads half the bytes (2-core Zen 3, Qwen2-0.5B shape: decode 76.0 vs 94.3
ms/token but TTFT 4,828 vs 894 ms and batch 8 4.6 vs 18.0 tok/s). The native kernel keeps the weights bf16
and widens each block of outputs with one integer op per 8 weights as it multiplies it into up to 6 rows
of the step at a time, in float32: decode reads half of float32's bytes, and prefill rows keep the FMA
units as busy as oneDNN's float32 GEMM does (native/bf16_gemm.cpp gives the measurements).
Activations stay bf16 between layers (the model's dtype); the kernel reads them as float32 and rounds
its output to bf16 once, as F.linear's bf16 result is rounded.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from tgserve.core.layers.linear import LinearMethod, linear_from_dense


class NativeBf16LinearMethod(LinearMethod):
    """Unquantized bf16 linear: the reference's dense parameters, the weight packed for the native kernel
    once loaded (the dense copy is then freed), the bias widened to float32 once."""

    name = "cpu-native-bf16"

    def __init__(self, ops):
        self.ops = ops  # torch.ops.tgserve_cpu_bf16 of the loaded library
        self.block_size = int(ops.bf16_block_size())  # outputs per packed block: this build's vector width x 2

    def prepare(self, params: dict[str, torch.Tensor]) -> object:
        weight = params["weight"]
        bias = params.get("bias")
        return (pack_weight(weight.to(torch.bfloat16), self.block_size),
                None if bias is None else bias.float().contiguous(), weight.shape[0])

    def apply(self, prepared: object, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] float32 or bf16 -> [..., out_features] in x's dtype."""
        packed, bias, out_features = prepared
        rows = x.reshape(-1, x.shape[-1])
        y = self.ops.bf16_linear(rows, packed, bias, out_features)
        return y.reshape(*x.shape[:-1], out_features)


def pack_weight(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """bf16 [N, K] -> bf16 [ceil(N / B), K, B], B = block_size: per block and input, output i at 2 i and
    output B / 2 + i at 2 i + 1 (native/bf16_gemm.cpp's word order); padded outputs are zeros, never stored."""
    out_features, in_features = weight.shape
    lanes = block_size // 2
    padded = F.pad(weight, (0, 0, 0, -out_features % block_size))
    return padded.view(-1, 2, lanes, in_features).permute(0, 3, 2, 1).reshape(-1, in_features, block_size).contiguous()


def make_native_bf16_linear_method(ops) -> NativeBf16LinearMethod | None:
    """The native bf16 method if the library loaded (`ops` not None) and answers like F.linear here."""
    if ops is None:
        return None
    return NativeBf16LinearMethod(ops) if is_usable(ops) else None


@functools.cache
def is_usable(ops) -> bool:
    """The start-up probe, once per library: a ragged layer with a bias at one row, a decode batch and a
    prefill-sized call (ragged row tiles), in bf16 and float32 activations, against float32 F.linear."""
    method = NativeBf16LinearMethod(ops)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3 * method.block_size + 5, 37, generator=generator).to(torch.bfloat16)
    bias = torch.randn(weight.shape[0], generator=generator).to(torch.bfloat16)
    try:
        layer = linear_from_dense(method, weight, bias)
        for num_rows in (1, 8, 67):
            for dtype in (torch.bfloat16, torch.float32):
                x = torch.randn(num_rows, weight.shape[1], generator=generator).to(dtype)
                with torch.no_grad():
                    y = layer(x)
                    expected = F.linear(x.float(), weight.float(), bias.float())
                tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # of the largest output; bf16 has 8 bits
                if (y.dtype != dtype or y.shape != expected.shape
                        or (y.float() - expected).abs().max() > tolerance * expected.abs().max()):
                    return False
    except RuntimeError:  # the library refused its own inputs: a bug, but not a reason to stop serving
        return False
    return True
