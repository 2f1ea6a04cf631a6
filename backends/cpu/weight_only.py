"""The cpu backend's weight-only kernels: int8 and int4 weights stay packed, activations stay float.

Both are private ATen ops that torch's CPU inductor emits for weight-only quantization (gpt-fast's
int8 / int4 paths), so no native code is built here:
  - `_weight_int8pack_mm(x, w_int8 [N, K], scales [N])`: per-output-channel int8, y = x @ (w * s)^T.
  - `_convert_weight_to_int4pack_for_cpu` + `_weight_int4pack_mm_for_cpu(x, packed, group, sz)`:
    4-bit codes, groups of 32/64/128/256, `sz` [K / group, N, 2] with w = (q - 8) * scale + zero.
Measured on a Sapphire Rapids VM (2 threads, bf16, batch 1, under load): [896 -> 9728] int8 0.46 ms,
int4 0.44 ms vs 0.82 ms for the oneDNN-packed bf16 weight; float32 activations make both ops ~10x
slower (no vectorized fp32 path), hence the per-dtype choices below. A kernel whose op is missing
from this torch build, or gives a wrong answer on this CPU and dtype (`matches_reference`, checked
once per process), is not offered: its layers run the core's reference kernel.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from tgserve.core.quantization.weight_only import AffineQuantizedWeight, ReferenceKernel, WeightOnlyKernel

INT8_OP = "_weight_int8pack_mm"
INT4_PACK_OP = "_convert_weight_to_int4pack_for_cpu"
INT4_OP = "_weight_int4pack_mm_for_cpu"
INT4_GROUP_SIZES = (256, 128, 64, 32)  # the groups the int4 op takes, largest (fewest scales) first
INT4_INNER_K_TILES = 2  # the packing's k-tiling argument (the CPU op accepts 2, 4, 8)
INT4_N_MULTIPLE = 16  # the int4 packing needs out_features in multiples of this
# Above this many rows per call the int8 op (a dot product per row, unvectorized for float32) loses to
# dequantizing OUTPUT_TILE output rows at a time into the run dtype and one GEMM per tile (prefill);
# decode batches stay on the packed op. Float32: the op's 5.8 ms at one row vs 35 ms for the reference.
INT8_MAX_PACKED_ROWS = {torch.float32: 4, torch.bfloat16: 32, torch.float16: 32}
OUTPUT_TILE = 1024


def aten_op(name: str):
    """torch.ops.aten.`name`, or None where this torch build lacks it (tests replace this to simulate that)."""
    return getattr(torch.ops.aten, name, None)


class CpuInt8Kernel(WeightOnlyKernel):
    """8-bit codes with one scale per output channel (eetq; GPTQ / compressed-tensors int8 channel-wise).

    The codes are stored as int8 q - 128; a zero point other than 128 adds (128 - zero) * scale * sum(x)
    per output, so asymmetric channels run on the same op."""

    name = "cpu-int8"

    def prepare(self, weight: AffineQuantizedWeight, dtype: torch.dtype) -> object | None:
        if weight.bits != 8 or weight.scales.shape[1] != 1 or dtype not in INT8_MAX_PACKED_ROWS:
            return None
        codes = (weight.q.to(torch.int16) - 128).to(torch.int8).contiguous()
        scales = weight.scales[:, 0].float()
        offsets = (128.0 - weight.zeros[:, 0].float()) * scales
        correction = offsets.to(dtype) if bool((weight.zeros != 128).any()) else None
        return codes, scales.to(dtype), correction, weight.bias, weight.input_perm

    def apply(self, prepared: object, x: torch.Tensor) -> torch.Tensor:
        codes, scales, correction, bias, input_perm = prepared
        rows = x.reshape(-1, x.shape[-1])
        if input_perm is not None:
            rows = rows.index_select(-1, input_perm)
        rows = rows.contiguous()
        if rows.shape[0] > INT8_MAX_PACKED_ROWS[x.dtype]:
            y = _tiled_dequantized_linear(rows, codes, scales, correction)
        else:
            y = aten_op(INT8_OP)(rows, codes, scales)
            if correction is not None:
                y = y + rows.sum(-1, keepdim=True) * correction
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], codes.shape[0])


def _tiled_dequantized_linear(rows: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                              correction: torch.Tensor | None) -> torch.Tensor:
    """rows [M, K] @ W^T for large M: OUTPUT_TILE output rows of W dequantized at a time, never all of it."""
    outputs = []
    for start in range(0, codes.shape[0], OUTPUT_TILE):
        tile = codes[start:start + OUTPUT_TILE].to(rows.dtype) * scales[start:start + OUTPUT_TILE, None]
        if correction is not None:
            tile += correction[start:start + OUTPUT_TILE, None]
        outputs.append(F.linear(rows, tile))
    return torch.cat(outputs, dim=-1)


class CpuInt4Kernel(WeightOnlyKernel):
    """Codes of 4 bits or fewer (GPTQ 2/3/4-bit, AWQ, compressed-tensors int4, GGUF Q4_0/Q4_1) in groups
    the op takes; a group that is a multiple of one of those (per-channel included) repeats its scale.
    bf16 / fp16 runs only: the op's float32 path is slower than the reference beyond one row."""

    name = "cpu-int4"
    dtypes = (torch.bfloat16, torch.float16)

    def prepare(self, weight: AffineQuantizedWeight, dtype: torch.dtype) -> object | None:
        out_features, in_features = weight.q.shape
        group = next((g for g in INT4_GROUP_SIZES if weight.group_size % g == 0 and in_features % g == 0), None)
        if weight.bits > 4 or dtype not in self.dtypes or group is None or out_features % INT4_N_MULTIPLE:
            return None
        packed = aten_op(INT4_PACK_OP)(weight.q.to(torch.int32).contiguous(), INT4_INNER_K_TILES)
        repeats = weight.group_size // group
        scales = weight.scales.float().repeat_interleave(repeats, dim=1)[:, :in_features // group]
        zeros = weight.zeros.float().repeat_interleave(repeats, dim=1)[:, :in_features // group]
        # (q - zero) * scale == (q - 8) * scale + (8 - zero) * scale
        scales_and_zeros = torch.stack([scales, (8.0 - zeros) * scales], dim=-1).transpose(0, 1)
        return packed, group, scales_and_zeros.to(dtype).contiguous(), weight.bias, weight.input_perm, out_features

    def apply(self, prepared: object, x: torch.Tensor) -> torch.Tensor:
        packed, group, scales_and_zeros, bias, input_perm, out_features = prepared
        rows = x.reshape(-1, x.shape[-1])
        if input_perm is not None:
            rows = rows.index_select(-1, input_perm)
        y = aten_op(INT4_OP)(rows.contiguous(), packed, group, scales_and_zeros)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], out_features)


def make_weight_only_kernels(dtype: torch.dtype) -> tuple[WeightOnlyKernel, ...]:
    """The fast kernels for runs in `dtype` whose ops exist in this torch and answer correctly here."""
    return tuple(kernel for kernel in (CpuInt8Kernel(), CpuInt4Kernel()) if is_usable(kernel.name, dtype))


@functools.cache
def is_usable(kernel_name: str, dtype: torch.dtype) -> bool:
    """Whether kernel `kernel_name` is present and correct for `dtype` runs here; probed once per process."""
    kernel = {"cpu-int8": CpuInt8Kernel, "cpu-int4": CpuInt4Kernel}[kernel_name]()
    ops = (INT8_OP,) if isinstance(kernel, CpuInt8Kernel) else (INT4_PACK_OP, INT4_OP)
    if any(aten_op(name) is None for name in ops):
        return False
    bits = 8 if isinstance(kernel, CpuInt8Kernel) else 4
    try:
        return matches_reference(kernel, dtype, bits)
    except (RuntimeError, NotImplementedError):  # op present but not built for this dtype / CPU
        return False


def matches_reference(kernel: WeightOnlyKernel, dtype: torch.dtype, bits: int) -> bool:
    """A small random weight (asymmetric zeros, a bias, an input permutation) through `kernel` and the
    reference, at one row, a decode batch and a prefill-sized batch. False when the kernel declines it too."""
    generator = torch.Generator().manual_seed(0)
    out_features, in_features = 48, 64
    group_size = in_features if bits == 8 else 32
    num_groups = in_features // group_size
    weight = AffineQuantizedWeight(
        q=torch.randint(0, 2**bits, (out_features, in_features), generator=generator, dtype=torch.uint8),
        scales=torch.rand(out_features, num_groups, generator=generator) / 50 + 1e-3,
        zeros=torch.randint(0, 2**bits, (out_features, num_groups), generator=generator).float(),
        bits=bits, group_size=group_size, input_perm=torch.randperm(in_features, generator=generator),
        bias=torch.randn(out_features, generator=generator).to(dtype))
    prepared = kernel.prepare(weight, dtype)
    if prepared is None:
        return False
    reference = ReferenceKernel().prepare(weight, dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # of the output's largest value; bf16 has 8 bits
    for num_rows in (1, 8, 2 * max(INT8_MAX_PACKED_ROWS.values())):
        x = torch.randn(num_rows, in_features, generator=generator).to(dtype)
        with torch.no_grad():
            y = kernel.apply(prepared, x).float()
            expected = ReferenceKernel().apply(reference, x).float()
        if y.shape != expected.shape or (y - expected).abs().max() > tolerance * expected.abs().max():
            return False
    return True
