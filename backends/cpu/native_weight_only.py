"""The cpu backend's native weight-only kernels: int8 and <= 4-bit codes packed for native/weight_only_gemm.cpp.

Unlike the aten ops (weight_only.py), which take one dot product per activation row and per-channel
int8 or bf16/fp16 int4 only, the native GEMM dequantizes each block of 16 output rows once and
multiplies it into every row of the step, for any group size (GGUF's 32 included), zeros, and
float32 / bf16 / fp16 activations. Above MAX_PACKED_ROWS rows (a prefill) it dequantizes 512 output
rows at a time into the run dtype and calls torch's GEMM on each tile.
bf16 / fp16 runs take int8 activations where the library was built with AVX512-VNNI
(has_int8_activations): x rounded to 8 bits per 32 inputs, integer dot products with the codes.
The float kernel is FMA-bound, not memory-bound, at every decode size: a decode batch ran slower than
oneDNN's AMX bf16 GEMM, and one row of [896 -> 9728] int4 g128 took 0.77 ms against 0.31 ms with int8
activations (one thread, Sapphire Rapids). Each row is rounded on its own, so a sequence's answer does
not depend on its batch. float32 runs never round, so they stay exact. `int8_activations=False` turns it off (the plugin's TGSERVE_CPU_INT8_ACTIVATIONS=0).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from tgserve.backends.cpu.weight_only import matches_reference
from tgserve.core.quantization.weight_only import AffineQuantizedWeight, WeightOnlyKernel

BLOCK_N = 16  # output rows per packed block: one 16-float vector (native/weight_only_gemm.cpp)
# Rows per call up to which the packed kernel runs; above, tiles of W are dequantized for torch's GEMM
# (whose blocking wins once the weight read is shared by this many rows).
MAX_PACKED_ROWS = 32
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class NativePacked:
    """What `apply` reads: the packed codes, per-group scale and shift, and the layer's extras."""

    __slots__ = ("ops", "codes", "scales", "shifts", "bias", "input_perm", "bits", "group_size", "out_features",
                 "int8_activations")

    def __init__(self, ops, codes, scales, shifts, bias, input_perm, bits, group_size, out_features,
                 int8_activations):
        self.ops = ops  # torch.ops.tgserve_cpu of the loaded library
        self.codes = codes  # uint8 [N / 16, K or ceil(K / 2), 16]
        self.scales = scales  # float32 [N / 16, num_groups, 16]
        self.shifts = shifts  # float32 [N / 16, num_groups, 16]: -zero * scale
        self.bias = bias  # [N] in the run dtype, or None
        self.input_perm = input_perm  # int64 [K] or None
        self.bits = bits  # 8, or at most 4
        self.group_size = group_size  # inputs per group
        self.out_features = out_features  # N
        self.int8_activations = int8_activations  # may round x to int8 (bf16 / fp16 rows)


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q uint8 [N, K] -> [ceil(N / 16), K', 16]: each block's 16 codes of one input side by side;
    bits <= 4 puts inputs 2j and 2j + 1 in the low and high nibble of byte j (K' = ceil(K / 2))."""
    out_features, in_features = q.shape
    blocks = F.pad(q, (0, 0, 0, -out_features % BLOCK_N)).view(-1, BLOCK_N, in_features).transpose(1, 2)
    if bits == 8:
        return blocks.contiguous()
    pairs = F.pad(blocks, (0, 0, 0, in_features % 2))  # a zero partner for an odd K (never read)
    return (pairs[:, 0::2] | (pairs[:, 1::2] << 4)).contiguous()


def pack_groups(values: torch.Tensor) -> torch.Tensor:
    """float [N, G] -> float32 [ceil(N / 16), G, 16], in the codes' block order."""
    out_features, num_groups = values.shape
    padded = F.pad(values.float(), (0, 0, 0, -out_features % BLOCK_N))
    return padded.view(-1, BLOCK_N, num_groups).transpose(1, 2).contiguous()


class NativeWeightOnlyKernel(WeightOnlyKernel):
    """Base of the two native kernels; `ops` is torch.ops.tgserve_cpu once the library is loaded."""

    def __init__(self, ops, int8_activations: bool = True):
        self.ops = ops
        self.int8_activations = int8_activations and has_int8_activations(ops)
        # The start-up log's words for it: says when activations may be rounded to int8.
        self.description = (f"{self.name} (int8 activations for bf16/fp16)" if self.int8_activations
                            else self.name)

    def takes_bits(self, bits: int) -> bool:
        raise NotImplementedError

    def prepare(self, weight: AffineQuantizedWeight, dtype: torch.dtype) -> NativePacked | None:
        in_features = weight.in_features
        group_size = min(weight.group_size, in_features)
        # 4-bit pairs (2j, 2j + 1) must not straddle groups: even groups, or one group per row.
        if not self.takes_bits(weight.bits) or dtype not in DTYPES or (
                weight.bits < 8 and group_size % 2 and group_size != in_features):
            return None
        scales = weight.scales.float()
        return NativePacked(self.ops, pack_codes(weight.q.to(torch.uint8), weight.bits), pack_groups(scales),
                            pack_groups(-weight.zeros.float() * scales), weight.bias, weight.input_perm,
                            weight.bits, group_size, weight.out_features,
                            self.int8_activations and dtype != torch.float32)

    def apply(self, prepared: NativePacked, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if prepared.input_perm is not None:
            rows = rows.index_select(-1, prepared.input_perm)
        y = prepared.ops.weight_only_linear(rows, prepared.codes, prepared.scales, prepared.shifts, prepared.bias,
                                            prepared.bits, prepared.group_size, prepared.out_features,
                                            MAX_PACKED_ROWS, prepared.int8_activations)
        return y.reshape(*x.shape[:-1], prepared.out_features)


class NativeInt8Kernel(NativeWeightOnlyKernel):
    """8-bit codes, any group size (GGUF Q8_0's 32, eetq's per channel), any zeros."""

    name = "cpu-native-int8"

    def takes_bits(self, bits: int) -> bool:
        return bits == 8


class NativeInt4Kernel(NativeWeightOnlyKernel):
    """Codes of 4 bits or fewer, two per byte (GPTQ 2/3/4-bit, AWQ, compressed-tensors int4, GGUF Q4_0/Q4_1)."""

    name = "cpu-native-int4"

    def takes_bits(self, bits: int) -> bool:
        return bits <= 4


def has_int8_activations(ops) -> bool:
    """Whether the loaded library has the int8-activation path (built for a CPU with AVX512-VNNI)."""
    has = getattr(ops, "has_int8_activations", None)
    return bool(has()) if has is not None else False


def make_native_kernels(dtype: torch.dtype, ops, int8_activations: bool = True) -> tuple[WeightOnlyKernel, ...]:
    """The native kernels that answer like the reference for `dtype` runs here (none without `ops`)."""
    if ops is None or dtype not in DTYPES:
        return ()
    int8_activations = int8_activations and dtype != torch.float32  # float32 stays exact (and says so in the log)
    return tuple(kernel for kernel in (NativeInt8Kernel(ops, int8_activations), NativeInt4Kernel(ops, int8_activations))
                 if is_usable(kernel.name, dtype, ops, int8_activations))


@functools.cache
def is_usable(kernel_name: str, dtype: torch.dtype, ops, int8_activations: bool = True) -> bool:
    """The start-up probe (weight_only.matches_reference), once per kernel, dtype, library and path."""
    kernel = {NativeInt8Kernel.name: NativeInt8Kernel,
              NativeInt4Kernel.name: NativeInt4Kernel}[kernel_name](ops, int8_activations)
    try:
        return matches_reference(kernel, dtype, 8 if isinstance(kernel, NativeInt8Kernel) else 4)
    except RuntimeError:  # the library refused its own inputs: a bug, but not a reason to stop serving
        return False
