"""The cpu backend's fused norm and activation: native/fused_elementwise.cpp behind the core's fused-ops seam.

Between its GEMMs a decoder layer ran ~40 separately dispatched torch ops, each a pass over its rows
and most a temporary: 3.5 ms of a batch-1 step of the Qwen2-0.5B shape on Zen 5, where the GEMMs
already read their weights at the memory wall. The two norms' residual add, float32 statistics and
scale, the MLP's SiLU and product, and the rotary embedding of the queries and keys (flip, two products,
a sum) are one native call each here (BENCHMARKS.md, "CPU: fused norm
and activation kernels"). Anything the op does not take (another dtype, rows that are not contiguous)
goes to the torch reference, which is also what the start-up probe compares against.
"""
from __future__ import annotations

import functools

import torch

from tgserve.core.layers.fused_ops import TorchFusedOps

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class NativeFusedOps(TorchFusedOps):
    """TorchFusedOps with each op one call into torch.ops.tgserve_cpu_fused (rows in torch's thread pool)."""

    name = "cpu-native-fused"

    def __init__(self, ops):
        self.ops = ops  # torch.ops.tgserve_cpu_fused of the loaded library

    def rms_norm(self, x, weight, eps):
        if not _takes(x, weight):
            return super().rms_norm(x, weight, eps)
        return self.ops.rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        if not (_takes(x, weight) and _takes(residual, weight)):
            return super().add_rms_norm(x, residual, weight, eps)
        return self.ops.add_rms_norm(x, residual, weight, eps)

    def silu_and_mul(self, gate_up):
        if gate_up.dim() != 2 or gate_up.dtype not in DTYPES or gate_up.stride(-1) != 1 or gate_up.shape[-1] % 2:
            return super().silu_and_mul(gate_up)
        return self.ops.silu_and_mul(gate_up)

    def rotary(self, cos_sin, x):
        cos, signed_sin = cos_sin
        rows, heads, d = x.shape if x.dim() == 3 else (0, 0, 0)
        if (x.dim() != 3 or x.dtype not in DTYPES or x.stride(2) != 1 or x.stride(1) != d or d % 2
                or cos.dtype != x.dtype or signed_sin.dtype != x.dtype):
            return super().rotary(cos_sin, x)
        return self.ops.rotary(x, cos.reshape(rows, d), signed_sin.reshape(rows, d))


def _takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the op takes this input: [T, hidden] with contiguous rows, in one of DTYPES, as its weight."""
    return x.dim() == 2 and x.dtype in DTYPES and x.dtype == weight.dtype and x.stride(-1) == 1


def make_native_fused_ops(ops, dtype: torch.dtype) -> NativeFusedOps | None:
    """The native ops where the library loaded, takes `dtype` and passes the start-up probe; else None."""
    if ops is None or dtype not in DTYPES or not is_usable(ops, dtype):
        return None
    return NativeFusedOps(ops)


# Of the reference output's largest magnitude: float32 differs in summation order only; bf16 / fp16 by
# at most one rounding of an output (a statistic on the other side of a rounding boundary).
PROBE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@functools.cache
def is_usable(ops, dtype: torch.dtype) -> bool:
    """Start-up probe, once per library and dtype: each op on 3 rows (odd widths; rotary on strided rows)
    against the reference."""
    generator = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(3, 37, generator=generator).to(dtype) for _ in range(2))
    weight = torch.rand(37, generator=generator).to(dtype)
    gate_up = (4 * torch.randn(3, 42, generator=generator)).to(dtype)
    qkv = torch.randn(3, 5 * 8, generator=generator).to(dtype)  # 3 query + 1 key heads of d 8, then 1 value head
    qk = qkv[:, :32].unflatten(-1, (4, 8))  # strided rows, as the model passes them
    cos_sin = tuple(torch.randn(3, 1, 8, generator=generator).to(dtype) for _ in range(2))
    native, reference = NativeFusedOps(ops), TorchFusedOps()
    try:
        pairs = [(native.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6)),
                 *zip(native.add_rms_norm(x, residual, weight, 1e-6),
                      reference.add_rms_norm(x, residual, weight, 1e-6)),
                 (native.silu_and_mul(gate_up), reference.silu_and_mul(gate_up)),
                 (native.rotary(cos_sin, qk), reference.rotary(cos_sin, qk))]
    except RuntimeError:  # the library refused its own inputs: a bug, but not a reason to stop serving
        return False
    return all(bool((a.float() - b.float()).abs().max() <= PROBE_TOLERANCE[dtype] * b.float().abs().max())
               for a, b in pairs)
